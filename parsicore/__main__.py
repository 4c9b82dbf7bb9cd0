"""python -m parsicore"""
from parsicore.cli import main

main()

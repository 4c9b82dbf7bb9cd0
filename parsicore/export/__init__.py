"""Exporters from training frameworks to the parsicore model format (no torch import here)."""

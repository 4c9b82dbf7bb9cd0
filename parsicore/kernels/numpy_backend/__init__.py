"""The ``numpy`` backend: im2col + BLAS matmul and vectorised NumPy; no Numba (the Termux path).

One module per op family, with the same stem as in :mod:`parsicore.ops` (whose ``FAMILIES`` is the one
list of families), each exposing ``FACTORIES``.
"""

from __future__ import annotations

import importlib

from parsicore.ops import FAMILIES as OP_FAMILIES

FAMILIES = {stem: importlib.import_module(f"{__name__}.{stem}") for stem in OP_FAMILIES}

FACTORIES = {op: factory for family in FAMILIES.values() for op, factory in family.FACTORIES.items()}

"""Backends: ``reference`` (naive ops, for tests), ``numpy`` (im2col + BLAS), ``numba`` (JIT kernels).

:func:`factories` returns the op-type -> factory table of a backend; the numba backend is imported only
when asked for, so ``import parsicore`` stays fast and works where Numba is not installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from parsicore.errors import BackendError

if TYPE_CHECKING:  # importing parsicore.kernels must not import numpy (board settings come first)
    from parsicore.kernels.base import Kernel, KernelSpec

    Factory = Callable[[KernelSpec], Kernel]
else:
    Factory = Callable[[Any], Any]

BACKENDS = ("reference", "numpy", "numba")


def numba_available() -> bool:
    """True when Numba can be imported here (without importing it)."""
    return importlib.util.find_spec("numba") is not None


def default_backend() -> str:
    """``numba`` when importable, else ``numpy``."""
    return "numba" if numba_available() else "numpy"


def factories(backend: str) -> dict[str, Factory]:
    """The op-type -> factory table of ``backend``; BackendError when unknown or unavailable."""
    if backend == "reference":
        from parsicore.kernels import reference

        return reference.FACTORIES
    if backend == "numpy":
        from parsicore.kernels import numpy_backend

        return numpy_backend.FACTORIES
    if backend == "numba":
        if not numba_available():
            raise BackendError("backend 'numba' is not available: Numba is not installed (use --backend numpy)")
        try:
            from parsicore.kernels import numba_backend
        except ImportError as e:
            raise BackendError(f"backend 'numba' failed to import: {e}") from e
        return numba_backend.FACTORIES
    raise BackendError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")

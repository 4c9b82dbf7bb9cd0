"""The ``numba`` backend: JIT kernels where they pay (convs, gates, pooling, same-shape Add and Mul), NumPy elsewhere.

Importing this package imports Numba, so it is only imported when the numba backend is chosen. The JIT
cache directory is set here, before Numba reads its configuration (see :mod:`parsicore.kernels.jit_cache`),
and so is the threads' wait policy, before Numba's threading layer loads libgomp (see
:mod:`parsicore.threads`).
"""

from __future__ import annotations

from parsicore import threads
from parsicore.kernels import jit_cache

jit_cache.configure_cache_dir()
threads.prepare_environment()

from parsicore.kernels import numpy_backend  # noqa: E402
from parsicore.kernels.numba_backend import conv, elementwise, gates, pool  # noqa: E402

#: Families with a Numba kernel; every other op uses the numpy backend's factory.
FAMILIES = {"conv": conv, "elementwise": elementwise, "gates": gates, "pool": pool}

FACTORIES = {**numpy_backend.FACTORIES}
for _family in FAMILIES.values():
    FACTORIES.update(_family.FACTORIES)

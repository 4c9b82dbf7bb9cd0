"""The ``numpy`` backend: im2col + BLAS matmul and vectorised NumPy; no Numba (the Termux path)."""

from __future__ import annotations

from parsicore.kernels.numpy_backend import (
    activation,
    batchnorm,
    concat,
    conv,
    elementwise,
    gates,
    gemm,
    pad,
    pool,
    shape,
    softmax,
)

FAMILIES = {
    "activation": activation,
    "batchnorm": batchnorm,
    "concat": concat,
    "conv": conv,
    "elementwise": elementwise,
    "gates": gates,
    "gemm": gemm,
    "pad": pad,
    "pool": pool,
    "shape": shape,
    "softmax": softmax,
}

FACTORIES = {op: factory for family in FAMILIES.values() for op, factory in family.FACTORIES.items()}

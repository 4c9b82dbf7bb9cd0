"""Gemm in NumPy: one BLAS matmul into the output, then bias and the fused activation in place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import KernelSpec, apply_activation


def make_gemm(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, F) -> y: float32 (N, K) = act(x @ weight.T + bias)."""
    weight = np.asarray(spec.weights["weight"], dtype=np.float32)
    (f,) = spec.in_shapes[0]
    (k,) = spec.out_shapes[0]
    if weight.shape != (k, f):
        raise ValueError(f"Gemm weight has shape {weight.shape}, expected {(k, f)}")
    # (F, K) contiguous: the matmul reads it row by row and writes y's rows directly.
    weight_t = np.ascontiguousarray(weight.T)
    bias = spec.weights.get("bias")
    bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(k)
    act = spec.activation

    def gemm(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, y = inputs[0], outputs[0]
        if x.ndim != 2 or x.shape[1] != f:
            raise ValueError(f"Gemm input has shape {x.shape}, expected (N, {f})")
        np.matmul(x, weight_t, out=y)
        if bias is not None:
            np.add(y, bias, out=y)
        apply_activation(y, act)

    return gemm


FACTORIES = {"Gemm": make_gemm}

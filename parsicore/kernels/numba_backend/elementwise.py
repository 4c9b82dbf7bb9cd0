"""Add and Mul of two tensors of one shape with the fused activation in the same pass (a residual Add and its
ReLU); every other form (a broadcast second input, a constant, a non-contiguous view) is the numpy backend's.

NumPy runs the sum and the activation as two passes over the tensor, and its maximum against a scalar (ReLU)
does not vectorise: one of ResNet-18's 64 x 56x56 residual Adds took 139 us there, 37 us here (1 thread, hot,
AVX2 Zen 4 VM: ``python scripts/bench_kernels.py --only residual_add``, which has the benchmark models' shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec
from parsicore.kernels.numba_backend.epilogue import ActivationParams, activation_params, clamp_bounds, finish_span
from parsicore.kernels.numba_backend.parallel import jit
from parsicore.kernels.numpy_backend import elementwise as numpy_elementwise

#: Elements combined before the activation runs over them (16 KB of float32: the block is still in L1).
BLOCK = 4096


@jit
def _binary_activation_kernel(a, b, multiply, code, alpha, beta, lo, hi, out):
    """a, b, out: float32 (E,) C-contiguous, out distinct from a and b: out = act(a * b if multiply else a + b).
    No activation, ReLU and clip: one loop, the clamp as selects (a NaN passes, as in finish_span); the other
    activations block by block (the sum, then finish_span on the block while it is in L1)."""
    n = np.uint64(out.shape[0])
    # Unsigned offsets: with a signed index Numba adds a negative-index check to every access, and the loops
    # did not vectorise (5x slower).
    clamps, lo_f, hi_f = clamp_bounds(code, lo, hi)
    if clamps:
        if multiply:
            for i in range(n):
                v = a[i] * b[i]
                out[i] = lo_f if v < lo_f else (hi_f if v > hi_f else v)
        else:
            for i in range(n):
                v = a[i] + b[i]
                out[i] = lo_f if v < lo_f else (hi_f if v > hi_f else v)
        return
    zero = np.float32(0.0)
    for block_start in range(0, out.shape[0], BLOCK):
        first = np.uint64(block_start)
        count = min(np.uint64(BLOCK), n - first)
        if multiply:
            for i in range(count):
                out[first + i] = a[first + i] * b[first + i]
        else:
            for i in range(count):
                out[first + i] = a[first + i] + b[first + i]
        finish_span(out, first, out, first, count, zero, code, alpha, beta, lo, hi)


def binary_activation(a: np.ndarray, b: np.ndarray, multiply: bool, params: ActivationParams,
                      out: np.ndarray) -> None:
    """a, b, out: float32 (N, *A), C-contiguous, one shape: out = act(a + b) (or a * b), act given by
    ``params`` (epilogue.activation_params of the fused activation)."""
    code, alpha, beta, lo, hi = params
    _binary_activation_kernel(a.reshape(-1), b.reshape(-1), multiply, code, alpha, beta, lo, hi, out.reshape(-1))


def make_binary(spec: KernelSpec) -> Kernel:
    """a: float32 (N, *A), b: float32 (N, *B) or the weight ``constant`` (*B) -> float32 (N, *A)."""
    fallback = numpy_elementwise.make_binary(spec)
    if spec.activation is None or len(spec.in_shapes) != 2 or tuple(spec.in_shapes[1]) != tuple(spec.in_shapes[0]):
        return fallback  # a lone sum or product is one pass in NumPy too, and as fast (0.9-1.0x there)
    multiply = spec.op == "Mul"
    params = activation_params(spec.activation)

    def binary(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        a, b = inputs
        if a.flags.c_contiguous and b.flags.c_contiguous:
            binary_activation(a, b, multiply, params, outputs[0])
        else:
            fallback(inputs, outputs)

    return binary


FACTORIES = {"Add": make_binary, "Mul": make_binary}

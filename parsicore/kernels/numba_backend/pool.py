"""Max and average pooling with Numba: per output row, a vertical pass then a horizontal one.

Same semantics as :mod:`parsicore.ops.pool` (PyTorch's rules, asymmetric pads, ceil_mode windows clipped
to the input, windows of padding only give 0, NaN propagates through max). For each output row the rows of
its windows are first combined element-wise over the whole input width (one unit-stride loop per row,
which vectorises), then each output takes the max / sum of its few columns of that combined row. Global
pooling keeps NumPy's kernels (its pairwise float32 sums and max are as fast and need no JIT).

Each factory checks shapes and makes the input C-contiguous, then calls a private ``@njit`` kernel that takes
only arrays and scalars; the parallel build runs over (image, channel) planes when the run allows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from parsicore.kernels import numpy_backend
from parsicore.kernels.base import KernelContext, KernelSpec
from parsicore.kernels.numba_backend.parallel import jit, jit_inline, serial_and_parallel
from parsicore.kernels.numpy_backend.pool import PoolGeometry, window_counts


@jit_inline
def _max_with_nan(a, b):
    """max(a, b) that returns NaN when either is NaN (as np.maximum)."""
    return a if (a > b or a != a) else b


@jit
def _max_rows(acc, src):
    for t in range(acc.shape[0]):
        acc[t] = _max_with_nan(acc[t], src[t])


@jit
def _add_rows(acc, src):
    for t in range(acc.shape[0]):
        acc[t] += src[t]


@jit_inline
def _clipped_max(row, start, kw):
    """max of row[start:start+kw] clipped to the row; 0 when the window holds no element."""
    w0 = max(start, 0)
    w1 = min(start + kw, row.shape[0])
    if w0 >= w1:
        return np.float32(0.0)
    best = row[w0]
    for iw in range(w0 + 1, w1):
        best = _max_with_nan(best, row[iw])
    return best


@serial_and_parallel
def _max_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, out):
    """x: float32 (N, C, H, W) -> out: float32 (N, C, Ho, Wo); the max over each window's input elements."""
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        combined = np.empty(w, dtype=np.float32)
        half = (w + 1) // 2
        even = np.empty(half, dtype=np.float32)
        odd = np.empty(half, dtype=np.float32)
        for oh in range(ho):
            dst = out[n, c, oh]
            h0 = oh * stride_h - top
            h1 = min(h0 + kh, h)
            h0 = max(h0, 0)
            if h0 >= h1:
                dst[:] = 0.0
                continue
            combined[:] = x[n, c, h0]
            for ih in range(h0 + 1, h1):
                _max_rows(combined, x[n, c, ih])
            # Interior outputs [ow_a, ow_b): windows wholly inside the row, no clipping.
            ow_a = min(wo, (left + stride_w - 1) // stride_w)
            ow_b = max(ow_a, min(wo, (w - kw + left) // stride_w + 1))
            if stride_w == 2 and ow_b > ow_a:
                # Split the row into even/odd columns once; tap j then reads parity (j - left) % 2 at
                # ow + (j - left) // 2: unit-stride loops over the interior outputs.
                for t in range(half):
                    even[t] = combined[2 * t]
                for t in range(w // 2):
                    odd[t] = combined[2 * t + 1]
                inner = dst[ow_a:ow_b]
                for j in range(kw):
                    o = j - left
                    shift = (o - o % 2) // 2
                    src = (even if o % 2 == 0 else odd)[ow_a + shift:ow_b + shift]
                    if j == 0:
                        inner[:] = src
                    else:
                        _max_rows(inner, src)
                edges_from, edges_to = ow_a, ow_b
            else:
                edges_from, edges_to = wo, wo
            for ow in range(edges_from):
                dst[ow] = _clipped_max(combined, ow * stride_w - left, kw)
            for ow in range(edges_to, wo):
                dst[ow] = _clipped_max(combined, ow * stride_w - left, kw)


@serial_and_parallel
def _average_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, reciprocal, out):
    """x: float32 (N, C, H, W); reciprocal: float32 (Ho, Wo), 1/divisor per window (0 for windows of padding
    only) -> out: float32 (N, C, Ho, Wo); each window's sum times its reciprocal."""
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        combined = np.empty(w, dtype=np.float32)
        for oh in range(ho):
            dst = out[n, c, oh]
            h0 = oh * stride_h - top
            h1 = min(h0 + kh, h)
            h0 = max(h0, 0)
            if h0 >= h1:
                dst[:] = 0.0
                continue
            combined[:] = x[n, c, h0]
            for ih in range(h0 + 1, h1):
                _add_rows(combined, x[n, c, ih])
            for ow in range(wo):
                w0 = ow * stride_w - left
                w1 = min(w0 + kw, w)
                w0 = max(w0, 0)
                acc = np.float32(0.0)
                for iw in range(w0, w1):
                    acc += combined[iw]
                dst[ow] = acc * reciprocal[oh, ow]


def _prepare(x: np.ndarray, y: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
             op: str) -> np.ndarray:
    """Check shapes; the input as C-contiguous float32 (the kernels are compiled for that layout)."""
    n = x.shape[0]
    if x.shape[1:] != tuple(in_shape) or y.shape != (n, *out_shape) or not y.flags.c_contiguous:
        raise ValueError(f"{op} got input {x.shape} and output {y.shape}, expected (N, {in_shape}) -> (N, {out_shape})")
    return np.ascontiguousarray(x, dtype=np.float32)


#: Inputs of fewer elements per image take NumPy's pool (measured: at 32x28x28 NumPy's few whole-tensor
#: operations beat the per-plane loops by their fixed cost; from ~100k elements the loops win, 3x at 64x112x112).
NUMPY_BELOW = 100_000


def make_max_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo)."""
    if np.prod(spec.in_shapes[0]) < NUMPY_BELOW:
        return numpy_backend.pool.make_max_pool(spec)
    g = PoolGeometry.from_spec(spec)
    context: KernelContext = spec.kernel_context()

    def max_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], spec.out_shapes[0], "MaxPool")
        _max_pool_kernel(context.threads, x.size, x, g.kh, g.kw, g.stride_h, g.stride_w, g.top, g.left, outputs[0])

    return max_pool


def make_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo)."""
    if np.prod(spec.in_shapes[0]) < NUMPY_BELOW:
        return numpy_backend.pool.make_average_pool(spec)
    g = PoolGeometry.from_spec(spec)
    context: KernelContext = spec.kernel_context()
    inside, clipped = window_counts(g)
    divisor = clipped if spec.attrs.count_include_pad else inside
    # Windows of padding only sum to 0; a 0 reciprocal keeps them 0 instead of 0/0.
    reciprocal = np.where(inside > 0, 1.0 / np.maximum(divisor, 1), 0.0).astype(np.float32)

    def average_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], spec.out_shapes[0], "AveragePool")
        _average_pool_kernel(context.threads, x.size, x, g.kh, g.kw, g.stride_h, g.stride_w, g.top, g.left,
                             reciprocal, outputs[0])

    return average_pool


FACTORIES = {
    "MaxPool": make_max_pool,
    "AveragePool": make_average_pool,
    "GlobalAveragePool": numpy_backend.pool.make_global_average_pool,
    "GlobalMaxPool": numpy_backend.pool.make_global_max_pool,
}

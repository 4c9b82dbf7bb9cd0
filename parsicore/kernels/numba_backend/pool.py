"""Max and average pooling with Numba: per output row, a vertical pass then a horizontal one.

Same semantics as :mod:`parsicore.ops.pool` (PyTorch's rules, asymmetric pads, ceil_mode windows clipped
to the input, windows of padding only give 0, NaN propagates through max). For each output row the rows of
its windows are first combined element-wise over the whole input width (one unit-stride loop per row,
which vectorises), then each output takes the max / sum of its few columns of that combined row. Global
pooling is one pass per (image, channel) row.

Each factory checks shapes and makes the input C-contiguous, then calls a private ``@njit`` kernel that takes
only arrays and scalars; the parallel build runs over (image, channel) planes when the run allows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from parsicore.kernels.base import KernelContext, KernelSpec
from parsicore.kernels.numba_backend.parallel import jit_inline, serial_and_parallel
from parsicore.kernels.numpy_backend.pool import PoolGeometry, window_counts


@jit_inline
def _max_with_nan(a, b):
    """max(a, b) that returns NaN when either is NaN (as np.maximum)."""
    return a if (a > b or a != a) else b


@jit_inline
def _edge_max(row, start, kw, propagate_nan):
    """max of row[start:start+kw] clipped to the row; 0 when the window holds no element. propagate_nan:
    NaN when the window holds one (else the row is known to hold none and the plain compare is used)."""
    w0 = max(start, 0)
    w1 = min(start + kw, row.shape[0])
    best = np.float32(0.0)
    if w0 < w1:
        best = row[w0]
        for iw in range(w0 + 1, w1):
            v = row[iw]
            best = _max_with_nan(best, v) if propagate_nan else (best if best > v else v)
    return best


@jit_inline
def _edge_sum(row, start, kw):
    """sum of row[start:start+kw] clipped to the row."""
    acc = np.float32(0.0)
    for iw in range(max(start, 0), min(start + kw, row.shape[0])):
        acc += row[iw]
    return acc


@jit_inline
def _interior(wo, w, kw, stride_w, left):
    """Output columns [ow_a, ow_b) whose windows lie wholly inside a row of width w (ow_a == ow_b: none)."""
    ow_a = min(wo, (left + stride_w - 1) // stride_w)
    ow_b = max(ow_a, min(wo, (w - kw + left) // stride_w + 1))
    return ow_a, ow_b


@jit_inline
def _max2(a, b):
    return a if a > b else b


@jit_inline
def _max_row_2x2(xf, of, base, pitch, d, count, stride):
    """One output row of interior 2x2 windows straight from the input (window t starts at base + t*stride, rows
    ``pitch`` apart) into of[d:d+count]; True when an input read is NaN (the caller then redoes the row)."""
    u = np.uint64
    one = u(1)
    nan = False
    for t in range(count):
        c = base + t * stride
        a = xf[c]
        b = xf[c + one]
        e = xf[c + pitch]
        f = xf[c + pitch + one]
        of[d + t] = _max2(_max2(a, b), _max2(e, f))
        nan |= (a != a) | (b != b) | (e != e) | (f != f)
    return nan


@jit_inline
def _max_row_3x3(xf, of, base, pitch, d, count, stride):
    """As _max_row_2x2 for 3x3 windows."""
    u = np.uint64
    one = u(1)
    two = u(2)
    nan = False
    for t in range(count):
        c0 = base + t * stride
        c1 = c0 + pitch
        c2 = c1 + pitch
        a0, a1, a2 = xf[c0], xf[c0 + one], xf[c0 + two]
        b0, b1, b2 = xf[c1], xf[c1 + one], xf[c1 + two]
        e0, e1, e2 = xf[c2], xf[c2 + one], xf[c2 + two]
        m = _max2(_max2(_max2(a0, a1), _max2(a2, b0)), _max2(_max2(b1, b2), _max2(e0, _max2(e1, e2))))
        of[d + t] = m
        nan |= (a0 != a0) | (a1 != a1) | (a2 != a2) | (b0 != b0) | (b1 != b1) | (b2 != b2)
        nan |= (e0 != e0) | (e1 != e1) | (e2 != e2)
    return nan


@jit_inline
def _window_max(xf, plane, w, h0, h1, start, kw):
    """The NaN-propagating max of rows [h0, h1) x columns [start, start+kw) clipped to the width w of the plane
    starting at flat index ``plane``; 0 when the window holds no element."""
    u = np.uint64
    w0 = max(start, 0)
    w1 = min(start + kw, w)
    best = np.float32(0.0)
    if w0 < w1:
        best = xf[plane + u(h0) * u(w) + u(w0)]
        for ih in range(h0, h1):
            row = plane + u(ih) * u(w)
            for iw in range(w0, w1):
                best = _max_with_nan(best, xf[row + u(iw)])
    return best


@serial_and_parallel
def _max_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, out):
    """x: float32 (N, C, H, W) -> out: float32 (N, C, Ho, Wo); the max over each window's input elements.

    Per (image, channel) plane and output row: the rows of its windows are combined element-wise over the
    whole width, then each output takes the max of its columns of that combined row (interior windows in
    unit-stride passes per tap column, the clipped edge windows one by one). Indices into the flat arrays are
    unsigned and no view is made per row (a view's reference count and a signed index's wrap-around check
    were the previous kernel's time). The passes compare with a plain ``a if a > b else b``, which LLVM
    vectorises; NaN-propagating compares do not vectorise (measured 3-6x slower), so the vertical pass
    records whether any input of the row is NaN and such rows are redone with the NaN-propagating compare.
    """
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    u = np.uint64
    xf = x.reshape(-1)
    of = out.reshape(-1)
    uw = u(w)
    uwo = u(wo)
    ow_a, ow_b = _interior(wo, w, kw, stride_w, left)
    first = u(max(0, ow_a * stride_w - left))
    direct = kh == kw and (kh == 2 or kh == 3) and ow_b > ow_a
    for task in numba.prange(n_images * c_count):
        src = u(task) * u(h) * uw
        dst = u(task) * u(ho) * uwo
        combined = np.empty(w, dtype=np.float32)
        for oh in range(ho):
            d = dst + u(oh) * uwo
            h0 = oh * stride_h - top
            h1 = min(h0 + kh, h)
            h0 = max(h0, 0)
            if h0 >= h1:
                for t in range(uwo):
                    of[d + t] = 0.0
                continue
            if direct and h1 - h0 == kh:
                # 2x2 / 3x3 windows whose rows lie inside: each interior output from its taps in registers (one
                # pass, 3-6x faster than the combined-row passes at 28x28 to 112x112), edges one by one.
                base = src + u(h0) * uw + first
                count = u(ow_b - ow_a)
                # Stride 2 passed as a literal: LLVM vectorises the interleaved loads (with a run-time stride it
                # gathers): ResNet-18's stem pool (3x3, 64 x 112x112) 448 -> 284 us hot, one-off.
                if kh == 2 and stride_w == 2:
                    nan = _max_row_2x2(xf, of, base, uw, d + u(ow_a), count, u(2))
                elif kh == 2:
                    nan = _max_row_2x2(xf, of, base, uw, d + u(ow_a), count, u(stride_w))
                elif stride_w == 2:
                    nan = _max_row_3x3(xf, of, base, uw, d + u(ow_a), count, u(2))
                else:
                    nan = _max_row_3x3(xf, of, base, uw, d + u(ow_a), count, u(stride_w))
                if not nan:
                    for ow in range(ow_a):
                        of[d + u(ow)] = _window_max(xf, src, w, h0, h1, ow * stride_w - left, kw)
                    for ow in range(ow_b, wo):
                        of[d + u(ow)] = _window_max(xf, src, w, h0, h1, ow * stride_w - left, kw)
                    continue
            nan = False
            r = src + u(h0) * uw
            for t in range(uw):
                v = xf[r + t]
                combined[t] = v
                nan |= v != v
            for ih in range(h0 + 1, h1):
                r = src + u(ih) * uw
                for t in range(uw):
                    a = combined[t]
                    v = xf[r + t]
                    combined[t] = a if a > v else v
                    nan |= v != v
            if nan:
                for ih in range(h0, h1):  # redo the row with NaN-propagating compares
                    r = src + u(ih) * uw
                    for t in range(uw):
                        combined[t] = xf[r + t] if ih == h0 else _max_with_nan(combined[t], xf[r + t])
                for ow in range(wo):
                    of[d + u(ow)] = _edge_max(combined, ow * stride_w - left, kw, True)
                continue
            for ow in range(ow_a, ow_b):
                of[d + u(ow)] = combined[first + u(ow - ow_a) * u(stride_w)]
            for j in range(1, kw):
                for ow in range(ow_a, ow_b):
                    a = of[d + u(ow)]
                    v = combined[first + u(ow - ow_a) * u(stride_w) + u(j)]
                    of[d + u(ow)] = a if a > v else v
            for ow in range(ow_a):
                of[d + u(ow)] = _edge_max(combined, ow * stride_w - left, kw, False)
            for ow in range(ow_b, wo):
                of[d + u(ow)] = _edge_max(combined, ow * stride_w - left, kw, False)


@serial_and_parallel
def _average_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, reciprocal, out):
    """x: float32 (N, C, H, W); reciprocal: float32 (Ho, Wo), 1/divisor per window (0 for windows of padding
    only) -> out: float32 (N, C, Ho, Wo); each window's sum times its reciprocal. Same passes and flat
    unsigned indices as _max_pool_kernel (sums propagate NaN by themselves)."""
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    u = np.uint64
    xf = x.reshape(-1)
    of = out.reshape(-1)
    rf = reciprocal.reshape(-1)
    uw = u(w)
    uwo = u(wo)
    ow_a, ow_b = _interior(wo, w, kw, stride_w, left)
    first = u(max(0, ow_a * stride_w - left))
    for task in numba.prange(n_images * c_count):
        src = u(task) * u(h) * uw
        dst = u(task) * u(ho) * uwo
        combined = np.empty(w, dtype=np.float32)
        for oh in range(ho):
            d = dst + u(oh) * uwo
            h0 = oh * stride_h - top
            h1 = min(h0 + kh, h)
            h0 = max(h0, 0)
            if h0 >= h1:
                for t in range(uwo):
                    of[d + t] = 0.0
                continue
            r = src + u(h0) * uw
            for t in range(uw):
                combined[t] = xf[r + t]
            for ih in range(h0 + 1, h1):
                r = src + u(ih) * uw
                for t in range(uw):
                    combined[t] += xf[r + t]
            for ow in range(ow_a, ow_b):
                of[d + u(ow)] = combined[first + u(ow - ow_a) * u(stride_w)]
            for j in range(1, kw):
                for ow in range(ow_a, ow_b):
                    of[d + u(ow)] += combined[first + u(ow - ow_a) * u(stride_w) + u(j)]
            for ow in range(ow_a):
                of[d + u(ow)] = _edge_sum(combined, ow * stride_w - left, kw)
            for ow in range(ow_b, wo):
                of[d + u(ow)] = _edge_sum(combined, ow * stride_w - left, kw)
            rr = u(oh) * uwo
            for t in range(uwo):
                of[d + t] *= rf[rr + t]


@serial_and_parallel
def _global_pool_kernel(x, take_max, out):
    """x: float32 (N*C, H*W) -> out: float32 (N*C,): the mean (float64 sum inside) or the max of each row.

    NumPy's reductions over a short trailing axis pay a fixed cost per row (17 us for 128 rows of 49, where
    this loop takes a few); the max compares with the vectorisable select and redoes a row holding a NaN.
    """
    rows, size = x.shape
    u = np.uint64
    xf = x.reshape(-1)
    usize = u(size)
    inverse = 1.0 / size
    for row in numba.prange(rows):
        start = u(row) * usize
        if take_max:
            best = xf[start]
            nan = False
            for t in range(usize):
                v = xf[start + t]
                best = best if best > v else v
                nan |= v != v
            out[row] = np.float32(np.nan) if nan else best
        else:
            acc = 0.0
            for t in range(usize):
                acc += xf[start + t]
            out[row] = np.float32(acc * inverse)


def _make_global_pool(spec: KernelSpec, take_max: bool) -> Any:
    c, h, w = spec.in_shapes[0]
    context: KernelContext = spec.kernel_context()
    op = "GlobalMaxPool" if take_max else "GlobalAveragePool"

    def global_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], (c, 1, 1), op)
        n = x.shape[0]
        _global_pool_kernel(context.threads, x.size, x.reshape(n * c, h * w), take_max, outputs[0].reshape(n * c))

    return global_pool


def make_global_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, 1, 1), the mean over H and W."""
    return _make_global_pool(spec, False)


def make_global_max_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, 1, 1), the max over H and W (NaN if one is NaN)."""
    return _make_global_pool(spec, True)


def _prepare(x: np.ndarray, y: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
             op: str) -> np.ndarray:
    """Check shapes; the input as C-contiguous float32 (the kernels are compiled for that layout)."""
    n = x.shape[0]
    if x.shape[1:] != tuple(in_shape) or y.shape != (n, *out_shape) or not y.flags.c_contiguous:
        raise ValueError(f"{op} got input {x.shape} and output {y.shape}, expected (N, {in_shape}) -> (N, {out_shape})")
    return np.ascontiguousarray(x, dtype=np.float32)


def make_max_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo)."""
    g = PoolGeometry.from_spec(spec)
    context: KernelContext = spec.kernel_context()

    def max_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], spec.out_shapes[0], "MaxPool")
        _max_pool_kernel(context.threads, x.size, x, g.kh, g.kw, g.stride_h, g.stride_w, g.top, g.left, outputs[0])

    return max_pool


def make_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo)."""
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
    "GlobalAveragePool": make_global_average_pool,
    "GlobalMaxPool": make_global_max_pool,
}

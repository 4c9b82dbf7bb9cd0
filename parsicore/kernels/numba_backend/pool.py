"""Pooling with Numba: one parallel pass over (image, channel) pairs, windows clipped by index arithmetic.

Same semantics as :mod:`parsicore.ops.pool` (PyTorch's rules, asymmetric pads, windows of padding only
give 0). Each public factory checks shapes and makes the input C-contiguous, then calls a private
``@njit`` kernel that takes only arrays and scalars.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from parsicore.kernels.base import KernelSpec
from parsicore.kernels.numpy_backend.pool import PoolGeometry


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _max_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, out):
    """x: float32 (N, C, H, W) -> out: float32 (N, C, Ho, Wo); the max over each window's input elements."""
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        for oh in range(ho):
            h0 = oh * stride_h - top
            h1 = min(h0 + kh, h)
            h0 = max(h0, 0)
            for ow in range(wo):
                w0 = ow * stride_w - left
                w1 = min(w0 + kw, w)
                w0 = max(w0, 0)
                if h0 >= h1 or w0 >= w1:
                    out[n, c, oh, ow] = 0.0
                    continue
                best = x[n, c, h0, w0]
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        v = x[n, c, ih, iw]
                        if v > best or np.isnan(v):  # NaN propagates, as in np.maximum and PyTorch
                            best = v
                out[n, c, oh, ow] = best


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _average_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, bottom, right, count_include_pad, out):
    """x: float32 (N, C, H, W) -> out: float32 (N, C, Ho, Wo); each window's sum over its divisor."""
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        for oh in range(ho):
            h0 = oh * stride_h - top
            h_end_padded = min(h0 + kh, h + bottom)
            h1 = min(h_end_padded, h)
            for ow in range(wo):
                w0 = ow * stride_w - left
                w_end_padded = min(w0 + kw, w + right)
                w1 = min(w_end_padded, w)
                padded_size = (h_end_padded - h0) * (w_end_padded - w0)
                hs = max(h0, 0)
                ws = max(w0, 0)
                if hs >= h1 or ws >= w1:
                    out[n, c, oh, ow] = 0.0
                    continue
                acc = np.float32(0.0)
                for ih in range(hs, h1):
                    for iw in range(ws, w1):
                        acc += x[n, c, ih, iw]
                divisor = padded_size if count_include_pad else (h1 - hs) * (w1 - ws)
                out[n, c, oh, ow] = acc / np.float32(divisor)


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _global_pool_kernel(x, use_max, out):
    """x: float32 (N, C, H, W) -> out: float32 (N, C, 1, 1); the mean (float64 sum) or the max over H, W."""
    n_images, c_count, h, w = x.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        if use_max:
            best = x[n, c, 0, 0]
            for i in range(h):
                for j in range(w):
                    v = x[n, c, i, j]
                    if v > best or np.isnan(v):
                        best = v
            out[n, c, 0, 0] = best
        else:
            acc = 0.0
            for i in range(h):
                for j in range(w):
                    acc += x[n, c, i, j]
            out[n, c, 0, 0] = acc / (h * w)


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

    def max_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], spec.out_shapes[0], "MaxPool")
        _max_pool_kernel(x, g.kh, g.kw, g.stride_h, g.stride_w, g.top, g.left, outputs[0])

    return max_pool


def make_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo)."""
    g = PoolGeometry.from_spec(spec)
    count_include_pad = bool(spec.attrs.count_include_pad)

    def average_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], spec.out_shapes[0], "AveragePool")
        _average_pool_kernel(x, g.kh, g.kw, g.stride_h, g.stride_w, g.top, g.left, g.bottom, g.right,
                             count_include_pad, outputs[0])

    return average_pool


def _make_global(spec: KernelSpec, use_max: bool) -> Any:
    op = spec.op

    def global_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = _prepare(inputs[0], outputs[0], spec.in_shapes[0], spec.out_shapes[0], op)
        _global_pool_kernel(x, use_max, outputs[0])

    return global_pool


def make_global_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, 1, 1), the mean over H and W."""
    return _make_global(spec, use_max=False)


def make_global_max_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, 1, 1), the max over H and W."""
    return _make_global(spec, use_max=True)


FACTORIES = {
    "MaxPool": make_max_pool,
    "AveragePool": make_average_pool,
    "GlobalAveragePool": make_global_average_pool,
    "GlobalMaxPool": make_global_max_pool,
}

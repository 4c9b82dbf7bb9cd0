"""Conv with Numba: parallel im2col, direct depthwise, fused bias + activation; the GEMM stays ``np.matmul``.

Numba has no BLAS of its own without SciPy, so the GEMM is NumPy's; what Numba replaces are the three
microkernels of :mod:`parsicore.kernels.numpy_backend.conv` (the orchestration, packing and gating logic are
shared with it). Each public function checks and normalises its arguments (C-contiguous float32, int64
indices) and calls a private ``@njit`` kernel; the kernels take only arrays and scalars, never globals
that could change (Numba freezes globals at compile time).
"""

from __future__ import annotations

import numba
import numpy as np

from parsicore.kernels.base import ACTIVATION_KINDS, Activation, KernelSpec
from parsicore.kernels.numpy_backend.conv import (
    MODE_BIAS,
    MODE_COMPUTE,
    MODE_ZERO,
    ConvGeometry,
    ConvKernel,
    ConvMicrokernels,
)

# Activation codes the kernels branch on: 0 = none, then ACTIVATION_KINDS in order (immutable ints, which
# Numba compiles in as constants).
_RELU, _CLIP, _LEAKY_RELU, _SIGMOID, _TANH, _HARD_SIGMOID, _HARD_SWISH, _SILU = (
    ACTIVATION_KINDS.index(kind) + 1
    for kind in ("relu", "clip", "leaky_relu", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "silu")
)


def activation_params(act: Activation | None) -> tuple[int, float, float, float, float]:
    """(code, alpha, beta, lo, hi) for the @njit kernels; code 0 means no activation."""
    if act is None:
        return 0, 0.0, 0.0, 0.0, 0.0
    if act.kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation {act.kind!r}")
    return ACTIVATION_KINDS.index(act.kind) + 1, float(act.alpha), float(act.beta), float(act.lo), float(act.hi)


@numba.njit(cache=True, nogil=True, fastmath=False)
def _sigmoid(v):
    # exp of -|v| never overflows, as in apply_activation.
    e = np.exp(-abs(v))
    return 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)


@numba.njit(cache=True, nogil=True, fastmath=False)
def _activate(v, code, alpha, beta, lo, hi):
    """One float32 value through activation ``code``; the same definitions as base.apply_activation."""
    if code == 0:
        return v
    if code == _RELU:
        return np.float32(0.0) if v < 0 else v  # NaN passes, as with np.maximum
    if code == _CLIP:
        return np.float32(min(max(v, lo), hi))
    if code == _LEAKY_RELU:
        return np.float32(v * alpha) if v < 0 else v
    if code == _SIGMOID:
        return np.float32(_sigmoid(v))
    if code == _TANH:
        return np.float32(np.tanh(v))
    if code == _HARD_SIGMOID:
        return np.float32(min(max(v * np.float32(alpha) + np.float32(beta), 0.0), 1.0))
    if code == _HARD_SWISH:
        return np.float32(v * (min(max(v + np.float32(3.0), 0.0), 6.0) / np.float32(6.0)))
    if code == _SILU:
        return np.float32(v * np.float32(_sigmoid(v)))
    return v


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _im2col_kernel(x, channels, kh, kw, stride_h, stride_w, dil_h, dil_w, top, left, ho, wo, cols):
    """x: float32 (N, C, H, W); channels: int64 (S,) -> cols: float32 (N, S*kh*kw, ho*wo); row (s*kh+i)*kw+j."""
    n_images, _, h, w = x.shape
    n_sel = channels.shape[0]
    for task in numba.prange(n_images * n_sel):
        n = task // n_sel
        s = task % n_sel
        c = channels[s]
        for i in range(kh):
            for j in range(kw):
                row = (s * kh + i) * kw + j
                for oh in range(ho):
                    ih = oh * stride_h - top + i * dil_h
                    base = oh * wo
                    if ih < 0 or ih >= h:
                        for ow in range(wo):
                            cols[n, row, base + ow] = 0.0
                        continue
                    for ow in range(wo):
                        iw = ow * stride_w - left + j * dil_w
                        if 0 <= iw < w:
                            cols[n, row, base + ow] = x[n, c, ih, iw]
                        else:
                            cols[n, row, base + ow] = 0.0


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _bias_activation_kernel(y, bias, has_bias, code, alpha, beta, lo, hi):
    """y: float32 (N, K, P) in place: y = act(y + bias[k])."""
    n_images, k, p = y.shape
    for task in numba.prange(n_images * k):
        n = task // k
        c = task % k
        b = bias[c] if has_bias else np.float32(0.0)
        for i in range(p):
            y[n, c, i] = _activate(y[n, c, i] + b, code, alpha, beta, lo, hi)


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _depthwise_kernel(x, filters, bias, modes, stride_h, stride_w, dil_h, dil_w, top, left,
                      code, alpha, beta, lo, hi, out):
    """x: float32 (N, C, H, W); filters: (C, kh, kw); bias: (C,); modes: int8 (N, C) -> out: (N, C, Ho, Wo)."""
    n_images, c_count, h, w = x.shape
    _, kh, kw = filters.shape
    _, _, ho, wo = out.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        mode = modes[n, c]
        if mode == MODE_ZERO:
            out[n, c, :, :] = 0.0
            continue
        if mode == MODE_BIAS:
            out[n, c, :, :] = _activate(bias[c], code, alpha, beta, lo, hi)
            continue
        # Tap by tap over whole output rows: for tap (i, j) the output columns whose input column lies
        # inside the image form one range [ow_lo, ow_hi), so the inner loop has no bounds test.
        out[n, c, :, :] = 0.0
        for i in range(kh):
            for j in range(kw):
                weight = filters[c, i, j]
                offset = j * dil_w - left
                ow_lo = max(0, (-offset + stride_w - 1) // stride_w)
                ow_hi = min(wo, (w - 1 - offset) // stride_w + 1)
                for oh in range(ho):
                    ih = oh * stride_h - top + i * dil_h
                    if ih < 0 or ih >= h:
                        continue
                    for ow in range(ow_lo, ow_hi):
                        out[n, c, oh, ow] += x[n, c, ih, ow * stride_w + offset] * weight
        b = bias[c]
        for oh in range(ho):
            for ow in range(wo):
                out[n, c, oh, ow] = _activate(out[n, c, oh, ow] + b, code, alpha, beta, lo, hi)


def im2col(x: np.ndarray, channels: np.ndarray | None, geom: ConvGeometry) -> np.ndarray:
    """As numpy_backend.conv.im2col: x: float32 (N, C, H, W) -> float32 (N, C_sel*kh*kw, Ho*Wo)."""
    if channels is None and geom.is_pointwise:
        n, c, h, w = x.shape
        return x.reshape(n, c, h * w)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if channels is None:
        channels = np.arange(x.shape[1], dtype=np.int64)
    channels = np.ascontiguousarray(channels, dtype=np.int64)
    cols = np.empty((x.shape[0], channels.size * geom.kh * geom.kw, geom.pixels), dtype=np.float32)
    _im2col_kernel(x, channels, geom.kh, geom.kw, geom.stride_h, geom.stride_w, geom.dil_h, geom.dil_w,
                   geom.top, geom.left, geom.ho, geom.wo, cols)
    return cols


def bias_activation(y: np.ndarray, bias: np.ndarray | None, act: Activation | None) -> None:
    """As numpy_backend.conv.bias_activation: y: float32 (N, K, P), C-contiguous, in place."""
    code, alpha, beta, lo, hi = activation_params(act)
    if bias is None and code == 0:
        return
    if not y.flags.c_contiguous:
        raise ValueError("bias_activation needs a C-contiguous array")
    has_bias = bias is not None
    bias = np.ascontiguousarray(bias, dtype=np.float32) if has_bias else np.zeros(y.shape[1], dtype=np.float32)
    _bias_activation_kernel(y, bias, has_bias, code, alpha, beta, lo, hi)


def depthwise(x: np.ndarray, filters: np.ndarray, bias: np.ndarray | None, act: Activation | None,
              modes: np.ndarray | None, geom: ConvGeometry, out: np.ndarray) -> None:
    """As numpy_backend.conv.depthwise, in one parallel pass over (image, channel) whatever the gating."""
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if modes is None:
        modes = np.full((n, geom.c), MODE_COMPUTE, dtype=np.int8)
    bias = np.zeros(geom.c, dtype=np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    code, alpha, beta, lo, hi = activation_params(act)
    _depthwise_kernel(x, np.ascontiguousarray(filters, dtype=np.float32), bias,
                      np.ascontiguousarray(modes, dtype=np.int8), geom.stride_h, geom.stride_w, geom.dil_h,
                      geom.dil_w, geom.top, geom.left, code, alpha, beta, lo, hi, out)


NUMBA_MICROKERNELS = ConvMicrokernels(im2col=im2col, depthwise=depthwise, bias_activation=bias_activation)


def make_conv(spec: KernelSpec) -> ConvKernel:
    """Factory: pack the weights of a Conv for the numba backend."""
    return ConvKernel(spec, NUMBA_MICROKERNELS)


FACTORIES = {"Conv": make_conv}

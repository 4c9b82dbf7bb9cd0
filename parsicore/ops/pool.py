"""Pooling: MaxPool, AveragePool (windowed) and GlobalAveragePool, GlobalMaxPool, over NCHW images.

Windowed pools follow PyTorch (``max_pool2d``/``avg_pool2d``), extended to asymmetric pads
(top, left, bottom, right) as ONNX writes them. Along one axis with input length L, kernel k, stride s and
pads (b, e)::

    out = floor((L + b + e - k) / s) + 1             (ceil instead of floor when ceil_mode)
    with ceil_mode, the last window must start inside the input or the leading pad: if (out - 1) * s >= L + b,
    the last output is dropped.

Output position o covers input rows [o*s - b, o*s - b + k). Max pooling ignores padding. Average pooling
divides by the number of input (non-pad) elements of the window, or with ``count_include_pad`` by the
window clipped to the padded input [-b, L + e) (the part of a ceil_mode window past the end pad never counts).
A window that holds no input element at all (possible only when a pad is >= the kernel) gives 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from parsicore.ops.base import Attrs, NoAttrs, OpDef, Shape, require_rank


@dataclass(frozen=True)
class PoolAttrs(Attrs):
    """kernel/stride: (h, w), stride None means stride = kernel; pads: (top, left, bottom, right)."""

    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    ceil_mode: bool = False

    def check(self) -> None:
        if min(self.kernel) < 1:
            raise ValueError(f"kernel must be >= 1, got {self.kernel}")
        if self.stride is not None and min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if min(self.pads) < 0:
            raise ValueError(f"pads must be >= 0, got {self.pads}")

    @property
    def strides(self) -> tuple[int, int]:
        """The effective stride (the kernel when ``stride`` is None)."""
        return self.kernel if self.stride is None else self.stride


@dataclass(frozen=True)
class MaxPoolAttrs(PoolAttrs):
    """The window attributes of PoolAttrs."""


@dataclass(frozen=True)
class AveragePoolAttrs(PoolAttrs):
    """As PoolAttrs; count_include_pad: divide by the window clipped to the padded input, pads included."""

    count_include_pad: bool = False


def pool_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, ceil_mode: bool) -> int:
    """Output length along one axis (PyTorch's rule); ValueError when no window fits."""
    span = size + pad_begin + pad_end - kernel
    if span < 0:
        raise ValueError(f"kernel {kernel} is larger than the padded input {size + pad_begin + pad_end}")
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def _pool_infer(attrs: PoolAttrs, in_shapes: Sequence[Shape]) -> list[Shape]:
    (shape,) = in_shapes
    require_rank(shape, 3)
    c, h, w = shape
    kh, kw = attrs.kernel
    sh, sw = attrs.strides
    top, left, bottom, right = attrs.pads
    ho = pool_output_size(h, kh, sh, top, bottom, attrs.ceil_mode)
    wo = pool_output_size(w, kw, sw, left, right, attrs.ceil_mode)
    return [(c, ho, wo)]


def _windowed_reference(attrs: PoolAttrs, x: np.ndarray, reduce: str) -> np.ndarray:
    """Loop over output positions, as PyTorch's CPU kernels do; reduce is 'max' or 'avg' (float64 inside)."""
    x = np.asarray(x, dtype=np.float64)
    n, c, h, w = x.shape
    kh, kw = attrs.kernel
    sh, sw = attrs.strides
    top, left, bottom, right = attrs.pads
    ho = pool_output_size(h, kh, sh, top, bottom, attrs.ceil_mode)
    wo = pool_output_size(w, kw, sw, left, right, attrs.ceil_mode)
    include_pad = getattr(attrs, "count_include_pad", False)
    y = np.zeros((n, c, ho, wo))
    for oh in range(ho):
        for ow in range(wo):
            h0, w0 = oh * sh - top, ow * sw - left
            # The window clipped to the padded input, then to the input itself.
            h1, w1 = min(h0 + kh, h + bottom), min(w0 + kw, w + right)
            padded_size = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
            if h0 >= h1 or w0 >= w1:
                continue  # the window holds only padding: 0
            window = x[:, :, h0:h1, w0:w1]
            if reduce == "max":
                y[:, :, oh, ow] = window.max(axis=(2, 3))
            else:
                divisor = padded_size if include_pad else (h1 - h0) * (w1 - w0)
                y[:, :, oh, ow] = window.sum(axis=(2, 3)) / divisor
    return y.astype(np.float32)


class MaxPoolOp(OpDef):
    type = "MaxPool"
    attrs = MaxPoolAttrs
    channelwise = True
    keeps_zero = True

    def infer(self, attrs: MaxPoolAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        return _pool_infer(attrs, in_shapes)

    def reference(self, attrs: MaxPoolAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [_windowed_reference(attrs, inputs[0], "max")]


class AveragePoolOp(OpDef):
    type = "AveragePool"
    attrs = AveragePoolAttrs
    channelwise = True
    keeps_zero = True

    def infer(self, attrs: AveragePoolAttrs, in_shapes: Sequence[Shape],
              weights: Mapping[str, Shape]) -> list[Shape]:
        return _pool_infer(attrs, in_shapes)

    def reference(self, attrs: AveragePoolAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [_windowed_reference(attrs, inputs[0], "avg")]


class _GlobalPoolOp(OpDef):
    attrs = NoAttrs
    channelwise = True
    keeps_zero = True

    def infer(self, attrs: NoAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        (shape,) = in_shapes
        require_rank(shape, 3)
        return [(shape[0], 1, 1)]


class GlobalAveragePoolOp(_GlobalPoolOp):
    type = "GlobalAveragePool"

    def reference(self, attrs: NoAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0], dtype=np.float64)
        n, c, h, w = x.shape
        y = np.zeros((n, c, 1, 1))
        for i in range(h):
            for j in range(w):
                y[:, :, 0, 0] += x[:, :, i, j]
        return [(y / (h * w)).astype(np.float32)]


class GlobalMaxPoolOp(_GlobalPoolOp):
    type = "GlobalMaxPool"

    def reference(self, attrs: NoAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0], dtype=np.float32)
        n, c, h, w = x.shape
        y = np.full((n, c, 1, 1), -np.inf, dtype=np.float32)
        for i in range(h):
            for j in range(w):
                y[:, :, 0, 0] = np.maximum(y[:, :, 0, 0], x[:, :, i, j])
        return [y]


OPS: tuple[OpDef, ...] = (MaxPoolOp(), AveragePoolOp(), GlobalAveragePoolOp(), GlobalMaxPoolOp())

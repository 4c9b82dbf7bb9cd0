"""Pooling in NumPy, vectorised over taps: one max/add over all (N, C, Ho, Wo) windows per kernel tap.

Windows are read from a padded copy of x (-inf around for max, 0 for average) large enough for every
window, including ceil_mode windows that run past the end pad. Window sizes depend only on the output
position, so the average's divisor is a (Ho, Wo) map computed once by the factory, per axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parsicore.kernels.base import KernelSpec


@dataclass(frozen=True)
class PoolGeometry:
    """Input (c, h, w), output (ho, wo), kernel, stride, pads (top, left, bottom, right)."""

    c: int
    h: int
    w: int
    ho: int
    wo: int
    kh: int
    kw: int
    stride_h: int
    stride_w: int
    top: int
    left: int
    bottom: int
    right: int

    @classmethod
    def from_spec(cls, spec: KernelSpec) -> PoolGeometry:
        c, h, w = spec.in_shapes[0]
        _, ho, wo = spec.out_shapes[0]
        a = spec.attrs
        kh, kw = a.kernel
        sh, sw = a.kernel if a.stride is None else a.stride
        top, left, bottom, right = a.pads
        return cls(c, h, w, ho, wo, kh, kw, sh, sw, top, left, bottom, right)

    @property
    def padded_h(self) -> int:
        """Rows of a padded copy holding every window (ceil_mode windows may pass the bottom pad)."""
        return max(self.top + self.h + self.bottom, (self.ho - 1) * self.stride_h + self.kh)

    @property
    def padded_w(self) -> int:
        return max(self.left + self.w + self.right, (self.wo - 1) * self.stride_w + self.kw)

    @property
    def needs_padding(self) -> bool:
        return (self.padded_h, self.padded_w) != (self.h, self.w)


def _axis_counts(out: int, kernel: int, stride: int, pad_begin: int, size: int, pad_end: int) -> tuple[
        np.ndarray, np.ndarray]:
    """Per output position along one axis: (input elements in the window, window clipped to the padded input)."""
    start = np.arange(out) * stride - pad_begin
    inside = np.minimum(start + kernel, size) - np.maximum(start, 0)
    clipped = np.minimum(start + kernel, size + pad_end) - start
    return np.maximum(inside, 0), clipped


def window_counts(geom: PoolGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(Ho, Wo) int maps: input elements per window, and window size clipped to the padded input."""
    inside_h, clipped_h = _axis_counts(geom.ho, geom.kh, geom.stride_h, geom.top, geom.h, geom.bottom)
    inside_w, clipped_w = _axis_counts(geom.wo, geom.kw, geom.stride_w, geom.left, geom.w, geom.right)
    return np.outer(inside_h, inside_w), np.outer(clipped_h, clipped_w)


def _padded(x: np.ndarray, geom: PoolGeometry, fill: float) -> np.ndarray:
    """x: float32 (N, C, H, W) -> (N, C, padded_h, padded_w) with ``fill`` around x (x itself when none needed)."""
    if not geom.needs_padding:
        return x
    n = x.shape[0]
    padded = np.full((n, geom.c, geom.padded_h, geom.padded_w), fill, dtype=np.float32)
    padded[:, :, geom.top:geom.top + geom.h, geom.left:geom.left + geom.w] = x
    return padded


def _taps(padded: np.ndarray, geom: PoolGeometry) -> Any:
    """Yield, per kernel tap, the (N, C, Ho, Wo) view of the element every window reads at that tap."""
    last_h = (geom.ho - 1) * geom.stride_h + 1
    last_w = (geom.wo - 1) * geom.stride_w + 1
    for i in range(geom.kh):
        for j in range(geom.kw):
            yield padded[:, :, i:i + last_h:geom.stride_h, j:j + last_w:geom.stride_w]


def _check(x: np.ndarray, y: np.ndarray, geom: PoolGeometry, op: str) -> None:
    if x.shape[1:] != (geom.c, geom.h, geom.w) or y.shape != (x.shape[0], geom.c, geom.ho, geom.wo):
        raise ValueError(f"{op} got input {x.shape} and output {y.shape} for geometry {geom}")


def make_max_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo), the max of each window's input elements."""
    geom = PoolGeometry.from_spec(spec)
    inside, _ = window_counts(geom)
    empty = inside == 0  # windows of padding only give 0

    def max_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, y = inputs[0], outputs[0]
        _check(x, y, geom, "MaxPool")
        for t, window in enumerate(_taps(_padded(x, geom, -np.inf), geom)):
            if t == 0:
                np.copyto(y, window)
            else:
                np.maximum(y, window, out=y)
        if empty.any():
            y[:, :, empty] = 0.0

    return max_pool


def make_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, Ho, Wo), each window's sum over its divisor."""
    geom = PoolGeometry.from_spec(spec)
    inside, clipped = window_counts(geom)
    divisor = clipped if spec.attrs.count_include_pad else inside
    # Windows of padding only sum to 0; a 0 reciprocal keeps them 0 instead of 0/0.
    reciprocal = np.where(inside > 0, 1.0 / np.maximum(divisor, 1), 0.0).astype(np.float32)

    def average_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, y = inputs[0], outputs[0]
        _check(x, y, geom, "AveragePool")
        for t, window in enumerate(_taps(_padded(x, geom, 0.0), geom)):
            if t == 0:
                np.copyto(y, window)
            else:
                np.add(y, window, out=y)
        np.multiply(y, reciprocal, out=y)

    return average_pool


def make_global_average_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, 1, 1), the mean over H and W."""

    def global_average_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, y = inputs[0], outputs[0]
        np.mean(x, axis=(2, 3), keepdims=True, out=y)

    return global_average_pool


def make_global_max_pool(spec: KernelSpec) -> Any:
    """Factory. x: float32 (N, C, H, W) -> y: float32 (N, C, 1, 1), the max over H and W."""

    def global_max_pool(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, y = inputs[0], outputs[0]
        np.max(x, axis=(2, 3), keepdims=True, out=y)

    return global_max_pool


FACTORIES = {
    "MaxPool": make_max_pool,
    "AveragePool": make_average_pool,
    "GlobalAveragePool": make_global_average_pool,
    "GlobalMaxPool": make_global_max_pool,
}

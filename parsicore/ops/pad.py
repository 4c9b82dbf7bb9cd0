"""Constant spatial padding: (N, C, H, W) -> (N, C, top + H + bottom, left + W + right)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from parsicore.ops.base import Attrs, OpDef, Shape, require_rank


@dataclass(frozen=True)
class PadAttrs(Attrs):
    """pads: (top, left, bottom, right), each >= 0; value: the constant written in the border."""

    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    value: float = 0.0

    def check(self) -> None:
        if any(p < 0 for p in self.pads):
            raise ValueError(f"Pad pads must be >= 0, got {self.pads}")


class Pad(OpDef):
    type = "Pad"
    attrs = PadAttrs
    channelwise = True
    # Zero channels stay zero only when value == 0, which the class variable cannot promise: see keeps_zero_for.
    keeps_zero = False

    def keeps_zero_for(self, attrs: PadAttrs) -> bool:
        """Whether an all-zero input channel gives an all-zero output channel with these attributes."""
        return attrs.value == 0.0

    def infer(self, attrs: PadAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        shape = tuple(in_shapes[0])
        require_rank(shape, 3)
        top, left, bottom, right = attrs.pads
        c, h, w = shape
        return [(c, top + h + bottom, left + w + right)]

    def reference(self, attrs: PadAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, C, H, W) -> float32 (N, C, H + top + bottom, W + left + right)."""
        x = inputs[0]
        top, left, bottom, right = attrs.pads
        n, c, h, w = x.shape
        out = np.empty((n, c, top + h + bottom, left + w + right), dtype=np.float32)
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                inside = top <= i < top + h and left <= j < left + w
                out[:, :, i, j] = x[:, :, i - top, j - left] if inside else attrs.value
        return [out]


OPS: tuple[OpDef, ...] = (Pad(),)

"""Softmax along one axis: y = exp(x - max) / sum(exp(x - max)), numerically stable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from parsicore.ops.base import Attrs, OpDef, Shape


@dataclass(frozen=True)
class SoftmaxAttrs(Attrs):
    """axis: counted in the full array including the batch dim (1 = channels/features); negative counts
    from the end. The batch axis (0) is refused; the upper bound is checked against the input's rank."""

    axis: int = 1

    def check(self) -> None:
        if self.axis == 0:
            raise ValueError("Softmax over the batch axis (axis=0) is not supported")


def full_axis(axis: int, feature_rank: int) -> int:
    """``axis`` as a positive index into the full (N, *features) array; ValueError when out of range."""
    rank = feature_rank + 1
    resolved = axis + rank if axis < 0 else axis
    if not 1 <= resolved < rank:
        raise ValueError(f"Softmax axis {axis} is out of range for a {rank}-dimensional input (batch included)")
    return resolved


class Softmax(OpDef):
    type = "Softmax"
    attrs = SoftmaxAttrs

    def infer(self, attrs: SoftmaxAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        shape = tuple(in_shapes[0])
        full_axis(attrs.axis, len(shape))
        return [shape]

    def reference(self, attrs: SoftmaxAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, ...) -> float32 (N, ...), each 1-D slice along ``axis`` normalised, in float64."""
        x = np.asarray(inputs[0], dtype=np.float64)
        axis = full_axis(attrs.axis, x.ndim - 1)
        moved = np.moveaxis(x, axis, -1)
        out = np.empty_like(moved)
        for index in np.ndindex(*moved.shape[:-1]):
            row = moved[index]
            e = np.exp(row - row.max())
            out[index] = e / e.sum()
        return [np.moveaxis(out, -1, axis).astype(np.float32)]


OPS: tuple[OpDef, ...] = (Softmax(),)

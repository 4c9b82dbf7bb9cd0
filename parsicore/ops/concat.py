"""Concatenation along the channel axis: (N, C_i, *S) for i in 1..64 -> (N, sum C_i, *S)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from parsicore.ops.base import Attrs, OpDef, Shape

MAX_INPUTS = 64


@dataclass(frozen=True)
class ConcatAttrs(Attrs):
    """axis: counted in the full array including the batch dim; only 1 (channels) is supported."""

    axis: int = 1

    def check(self) -> None:
        if self.axis != 1:
            raise ValueError(f"Concat supports only axis=1 (channels), got axis={self.axis}")


class Concat(OpDef):
    type = "Concat"
    attrs = ConcatAttrs
    num_inputs = (1, MAX_INPUTS)

    def infer(self, attrs: ConcatAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        shapes = [tuple(s) for s in in_shapes]
        if not 1 <= len(shapes) <= MAX_INPUTS:
            raise ValueError(f"Concat takes 1 to {MAX_INPUTS} inputs, got {len(shapes)}")
        first = shapes[0]
        if len(first) < 1:
            raise ValueError("Concat inputs need a channel dimension")
        for s in shapes[1:]:
            if len(s) != len(first) or s[1:] != first[1:]:
                raise ValueError(f"Concat inputs differ outside the channel axis: {first} and {s}")
        return [(sum(s[0] for s in shapes),) + first[1:]]

    def reference(self, attrs: ConcatAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """inputs: float32 (N, C_i, *S) -> float32 (N, sum C_i, *S), copied channel by channel."""
        n = inputs[0].shape[0]
        total = sum(x.shape[1] for x in inputs)
        out = np.empty((n, total) + inputs[0].shape[2:], dtype=np.float32)
        c_out = 0
        for x in inputs:
            for c in range(x.shape[1]):
                out[:, c_out] = x[:, c]
                c_out += 1
        return [out]


OPS: tuple[OpDef, ...] = (Concat(),)

"""Element-wise Add and Mul of a tensor with a second tensor or with a constant weight.

- Two inputs ``a`` (N, *A) and ``b`` (N, *B): ``B`` must broadcast to ``A`` by NumPy rules applied to the
  *feature* shapes (right-aligned, without the batch dim): same shape, per-channel ``(C, 1, 1)``,
  scalar-like ``(1, 1, 1)`` or ``(1,)``. The output has ``a``'s shape; ``b`` may never enlarge it.
- One input ``a`` and the weight ``constant``: ``constant``'s shape (no batch dim) broadcasts to ``A`` the
  same way. The weight is required with one input and refused with two.

Not channelwise: a per-element second operand may mix anything into a channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from parsicore.ops.base import NoAttrs, OpDef, Shape


def check_broadcast(target: Shape, other: Shape, what: str) -> None:
    """Raise ValueError unless feature shape ``other`` broadcasts to ``target`` without enlarging it."""
    if len(other) > len(target):
        raise ValueError(f"{what} shape {other} has more dimensions than the input's {target}")
    for t, o in zip(target[::-1], other[::-1]):
        if o != 1 and o != t:
            raise ValueError(f"{what} shape {other} does not broadcast to the input's {target}")


def align_batched(b: np.ndarray, target_feature_rank: int) -> np.ndarray:
    """View of batched b (N, *B) as (N, 1, ..., 1, *B) with 1 + target_feature_rank dims.

    NumPy would right-align (N, *B) against (N, *A) and pair N with a feature dim; the ones inserted
    after N keep the batch dims paired.
    """
    extra = target_feature_rank - (b.ndim - 1)
    return b.reshape(b.shape[:1] + (1,) * extra + b.shape[1:])


class BinaryOp(OpDef):
    """Shared rules of Add and Mul."""

    attrs = NoAttrs
    num_inputs = (1, 2)
    optional_weights = ("constant",)

    def infer(self, attrs: Any, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        a = tuple(in_shapes[0])
        if len(in_shapes) == 2:
            if "constant" in weights:
                raise ValueError(f"{self.type} with two inputs takes no 'constant' weight")
            check_broadcast(a, tuple(in_shapes[1]), "second input")
        else:
            if "constant" not in weights:
                raise ValueError(f"{self.type} with one input needs the weight 'constant'")
            check_broadcast(a, tuple(weights["constant"]), "weight 'constant'")
        return [a]

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The element-wise operation on float64 arrays (NumPy broadcasting)."""
        raise NotImplementedError

    def reference(self, attrs: Any, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """a: float32 (N, *A); b: float32 (N, *B) or constant (*B) -> float32 (N, *A), in float64."""
        a = np.asarray(inputs[0], dtype=np.float64)
        if len(inputs) == 2:
            b = align_batched(np.asarray(inputs[1], dtype=np.float64), a.ndim - 1)
        else:
            b = np.asarray(weights["constant"], dtype=np.float64)
        out = self.combine(a, b)
        if out.shape != a.shape:
            raise ValueError(f"second operand enlarged the input from {a.shape} to {out.shape}")
        return [out.astype(np.float32)]


class Add(BinaryOp):
    type = "Add"

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b


class Mul(BinaryOp):
    type = "Mul"

    def macs(self, attrs: Any, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        return int(np.prod(out_shapes[0]))  # one multiply per output element

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b


OPS: tuple[BinaryOp, ...] = (Add(), Mul())

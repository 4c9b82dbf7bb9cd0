"""Ops that only move or pass data: Flatten, Reshape, Identity, Dropout (identity at inference)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parsicore.ops.base import Attrs, NoAttrs, OpDef, Shape


@dataclass(frozen=True)
class FlattenAttrs(Attrs):
    """axis: counted in the full array including the batch dim; only 1 (keep N, flatten the rest)."""

    axis: int = 1

    def check(self) -> None:
        if self.axis != 1:
            raise ValueError(f"Flatten supports only axis=1, got axis={self.axis}")


@dataclass(frozen=True)
class ReshapeAttrs(Attrs):
    """shape: the target FEATURE shape (without the batch dim); sizes > 0, at most one -1 (inferred)."""

    shape: tuple[int, ...] = ()

    def check(self) -> None:
        if not self.shape:
            raise ValueError("Reshape needs a non-empty target 'shape'")
        if sum(1 for d in self.shape if d == -1) > 1:
            raise ValueError(f"Reshape target shape {self.shape} has more than one -1")
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(f"Reshape target sizes must be > 0 or -1, got {self.shape}")


@dataclass(frozen=True)
class DropoutAttrs(Attrs):
    """ratio: the training drop probability, unused at inference; kept to round-trip models."""

    ratio: float = 0.5

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"Dropout ratio must be in [0, 1), got {self.ratio}")


def resolve_reshape(source: Shape, target: Shape) -> Shape:
    """The concrete target shape for a source feature shape (fills the -1); ValueError when sizes differ."""
    size = math.prod(source)
    known = math.prod(d for d in target if d != -1)
    if -1 in target:
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape feature shape {source} ({size} values) to {target}")
        return tuple(size // known if d == -1 else d for d in target)
    if known != size:
        raise ValueError(f"cannot reshape feature shape {source} ({size} values) to {target} ({known} values)")
    return tuple(target)


class Flatten(OpDef):
    type = "Flatten"
    attrs = FlattenAttrs

    def infer(self, attrs: FlattenAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        return [(math.prod(in_shapes[0]),)]

    def reference(self, attrs: FlattenAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, ...) -> float32 (N, prod(...)) in C order."""
        x = inputs[0]
        n = x.shape[0]
        out = np.empty((n, math.prod(x.shape[1:])), dtype=np.float32)
        for i, index in enumerate(np.ndindex(*x.shape[1:])):
            out[:, i] = x[(slice(None),) + index]
        return [out]


class Reshape(OpDef):
    type = "Reshape"
    attrs = ReshapeAttrs

    def infer(self, attrs: ReshapeAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        return [resolve_reshape(tuple(in_shapes[0]), attrs.shape)]

    def reference(self, attrs: ReshapeAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, *S) -> float32 (N, *target), values in C order."""
        x = inputs[0]
        target = resolve_reshape(x.shape[1:], attrs.shape)
        out = np.empty((x.shape[0],) + target, dtype=np.float32)
        for src, dst in zip(np.ndindex(*x.shape[1:]), np.ndindex(*target)):
            out[(slice(None),) + dst] = x[(slice(None),) + src]
        return [out]


class IdentityOp(OpDef):
    """Shared rules of Identity and Dropout: output = input."""

    channelwise = True
    keeps_zero = True

    def infer(self, attrs: Any, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        return [tuple(in_shapes[0])]

    def reference(self, attrs: Any, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.array(inputs[0], dtype=np.float32, copy=True)]


class Identity(IdentityOp):
    type = "Identity"
    attrs = NoAttrs


class Dropout(IdentityOp):
    type = "Dropout"
    attrs = DropoutAttrs


OPS: tuple[OpDef, ...] = (Flatten(), Reshape(), Identity(), Dropout())

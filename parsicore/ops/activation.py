"""Element-wise activations: Relu, Clip (ReLU6), LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, Silu.

Every activation takes one tensor of any rank and returns the same shape. Each op can describe itself as
an :class:`~parsicore.kernels.base.Activation` (``to_activation``) so the planner can fuse it into the
epilogue of a preceding Conv or Gemm.

The references compute in float64 with the textbook formula, independently of
:func:`~parsicore.kernels.base.apply_activation`, so the tests comparing the two can catch a wrong
epilogue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from parsicore.kernels.base import Activation
from parsicore.ops.base import Attrs, NoAttrs, OpDef, Shape


@dataclass(frozen=True)
class ClipAttrs(Attrs):
    """y = min(max(x, lo), hi); ReLU6 is lo=0, hi=6."""

    lo: float = 0.0
    hi: float = 6.0

    def check(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"Clip needs lo <= hi, got lo={self.lo}, hi={self.hi}")


@dataclass(frozen=True)
class LeakyReluAttrs(Attrs):
    """y = x for x >= 0, alpha * x for x < 0."""

    alpha: float = 0.01


@dataclass(frozen=True)
class HardSigmoidAttrs(Attrs):
    """y = max(0, min(1, alpha * x + beta)). ONNX defaults; PyTorch's Hardsigmoid is alpha=1/6, beta=0.5."""

    alpha: float = 0.2
    beta: float = 0.5


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in float64; exp overflows to inf for very negative x, giving the right limit 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


class ActivationOp(OpDef):
    """Shared rules: one input of any rank, same output shape, no weights, channel c -> channel c."""

    num_inputs: ClassVar[tuple[int, int]] = (1, 1)
    channelwise: ClassVar[bool] = True
    keeps_zero: ClassVar[bool] = True

    def infer(self, attrs: Any, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        return [tuple(in_shapes[0])]

    def keeps_zero_for(self, attrs: Any) -> bool:
        """Whether act(0) == 0 for these attributes (the class variable holds only if true for all)."""
        return self.keeps_zero

    def to_activation(self, attrs: Any) -> Activation:
        """The fusable epilogue equivalent to this op with ``attrs``."""
        raise NotImplementedError

    def formula(self, attrs: Any, x: np.ndarray) -> np.ndarray:
        """The activation of float64 array ``x`` (any shape), float64 result."""
        raise NotImplementedError

    def reference(self, attrs: Any, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, ...) -> float32 (N, ...), computed in float64."""
        x = np.asarray(inputs[0], dtype=np.float64)
        return [self.formula(attrs, x).astype(np.float32)]


class Relu(ActivationOp):
    type = "Relu"
    attrs = NoAttrs

    def to_activation(self, attrs: Any) -> Activation:
        return Activation("relu")

    def formula(self, attrs: Any, x: np.ndarray) -> np.ndarray:
        return np.where(x > 0.0, x, 0.0)


class Clip(ActivationOp):
    type = "Clip"
    attrs = ClipAttrs
    # Clip(0) == 0 only when lo <= 0 <= hi, which the class variable cannot promise: see keeps_zero_for.
    keeps_zero = False

    def keeps_zero_for(self, attrs: ClipAttrs) -> bool:
        return attrs.lo <= 0.0 <= attrs.hi

    def to_activation(self, attrs: ClipAttrs) -> Activation:
        return Activation("clip", lo=attrs.lo, hi=attrs.hi)

    def formula(self, attrs: ClipAttrs, x: np.ndarray) -> np.ndarray:
        return np.where(x < attrs.lo, attrs.lo, np.where(x > attrs.hi, attrs.hi, x))


class LeakyRelu(ActivationOp):
    type = "LeakyRelu"
    attrs = LeakyReluAttrs

    def to_activation(self, attrs: LeakyReluAttrs) -> Activation:
        return Activation("leaky_relu", alpha=attrs.alpha)

    def formula(self, attrs: LeakyReluAttrs, x: np.ndarray) -> np.ndarray:
        return np.where(x >= 0.0, x, attrs.alpha * x)


class Sigmoid(ActivationOp):
    type = "Sigmoid"
    attrs = NoAttrs
    keeps_zero = False  # sigmoid(0) = 0.5

    def to_activation(self, attrs: Any) -> Activation:
        return Activation("sigmoid")

    def formula(self, attrs: Any, x: np.ndarray) -> np.ndarray:
        return _sigmoid64(x)


class Tanh(ActivationOp):
    type = "Tanh"
    attrs = NoAttrs

    def to_activation(self, attrs: Any) -> Activation:
        return Activation("tanh")

    def formula(self, attrs: Any, x: np.ndarray) -> np.ndarray:
        return np.tanh(x)


class HardSigmoid(ActivationOp):
    type = "HardSigmoid"
    attrs = HardSigmoidAttrs
    keeps_zero = False  # hard_sigmoid(0) = beta

    def keeps_zero_for(self, attrs: HardSigmoidAttrs) -> bool:
        return attrs.beta <= 0.0

    def to_activation(self, attrs: HardSigmoidAttrs) -> Activation:
        return Activation("hard_sigmoid", alpha=attrs.alpha, beta=attrs.beta)

    def formula(self, attrs: HardSigmoidAttrs, x: np.ndarray) -> np.ndarray:
        y = attrs.alpha * x + attrs.beta
        return np.where(y < 0.0, 0.0, np.where(y > 1.0, 1.0, y))


class HardSwish(ActivationOp):
    type = "HardSwish"
    attrs = NoAttrs

    def to_activation(self, attrs: Any) -> Activation:
        return Activation("hard_swish")

    def formula(self, attrs: Any, x: np.ndarray) -> np.ndarray:
        # x * relu6(x + 3) / 6, piecewise: 0 below -3, x above 3.
        return np.where(x <= -3.0, 0.0, np.where(x >= 3.0, x, x * (x + 3.0) / 6.0))


class Silu(ActivationOp):
    type = "Silu"
    attrs = NoAttrs

    def to_activation(self, attrs: Any) -> Activation:
        return Activation("silu")

    def formula(self, attrs: Any, x: np.ndarray) -> np.ndarray:
        return x * _sigmoid64(x)


OPS: tuple[ActivationOp, ...] = (
    Relu(), Clip(), LeakyRelu(), Sigmoid(), Tanh(), HardSigmoid(), HardSwish(), Silu(),
)

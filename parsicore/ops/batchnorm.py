"""Inference batch normalisation, and folding it into the preceding Conv or Gemm.

``y[n, c] = (x[n, c] - mean[c]) / sqrt(var[c] + epsilon) * scale[c] + bias[c]`` on ``(N, C, H, W)`` or
``(N, C)``. The planner folds ``Conv -> BatchNorm`` (and ``Gemm -> BatchNorm``) with :func:`fold_into_conv`
so the BN costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from parsicore.ops.base import Attrs, OpDef, Shape, require_weight_shape


@dataclass(frozen=True)
class BatchNormAttrs(Attrs):
    epsilon: float = 1e-5

    def check(self) -> None:
        if not self.epsilon > 0.0:
            raise ValueError(f"BatchNorm epsilon must be > 0, got {self.epsilon}")


def check_variance(var: np.ndarray) -> None:
    """Raise ValueError when a variance is negative (its square root would silently give NaN)."""
    if np.any(np.asarray(var) < 0.0):
        raise ValueError("BatchNorm weight 'var' has negative values")


def bn_scale_shift(scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """BN as ``y = a * x + b`` per channel: float64 (C,) arrays ``a``, ``b``; ValueError on negative var."""
    check_variance(var)
    a = np.asarray(scale, dtype=np.float64) / np.sqrt(np.asarray(var, dtype=np.float64) + epsilon)
    b = np.asarray(bias, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * a
    return a, b


def fold_into_conv(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, bn_bias: np.ndarray,
                   mean: np.ndarray, var: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BatchNorm that follows a Conv (or Gemm) into that layer's weight and bias.

    weight: (K, ...) with output channels on axis 0: Conv (K, C/g, kh, kw), Gemm (K, C).
    bias: (K,) or None (a conv without bias). scale, bn_bias, mean, var: (K,). Computed in float64.
    Returns float32 ``(weight', bias')`` with ``layer'(x) == BN(layer(x))``. ValueError on shape mismatch
    or negative variance.
    """
    weight = np.asarray(weight)
    k = weight.shape[0] if weight.ndim else 0
    for name, v in (("scale", scale), ("bias", bn_bias), ("mean", mean), ("var", var)):
        if np.shape(v) != (k,):
            raise ValueError(f"BatchNorm weight {name!r} has shape {np.shape(v)}, expected ({k},)")
    if bias is not None and np.shape(bias) != (k,):
        raise ValueError(f"bias has shape {np.shape(bias)}, expected ({k},)")
    a, b = bn_scale_shift(scale, bn_bias, mean, var, epsilon)
    folded_w = weight.astype(np.float64) * a.reshape((k,) + (1,) * (weight.ndim - 1))
    old_bias = np.zeros(k) if bias is None else np.asarray(bias, dtype=np.float64)
    folded_b = a * old_bias + b
    return folded_w.astype(np.float32), folded_b.astype(np.float32)


class BatchNorm(OpDef):
    type = "BatchNorm"
    attrs = BatchNormAttrs
    weights: ClassVar[tuple[str, ...]] = ("scale", "bias", "mean", "var")
    channelwise = True
    keeps_zero = False  # a zero channel becomes bias - mean * scale / sqrt(var + eps)

    def infer(self, attrs: BatchNormAttrs, in_shapes: Sequence[Shape],
              weights: Mapping[str, Shape]) -> list[Shape]:
        shape = tuple(in_shapes[0])
        if len(shape) not in (1, 3):
            raise ValueError(f"BatchNorm input must be (N, C) or (N, C, H, W), got feature shape {shape}")
        for name in self.weights:
            require_weight_shape(weights, name, (shape[0],))
        return [shape]

    def macs(self, attrs: Any, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        # One multiply-add per element once folded to a * x + b (zero when the planner folds it away).
        return int(np.prod(out_shapes[0]))

    def reference(self, attrs: BatchNormAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, C, H, W) or (N, C) -> same shape, computed per channel in float64."""
        check_variance(weights["var"])
        x = np.asarray(inputs[0], dtype=np.float64)
        y = np.empty_like(x)
        for c in range(x.shape[1]):
            mean = float(weights["mean"][c])
            std = np.sqrt(float(weights["var"][c]) + attrs.epsilon)
            y[:, c] = (x[:, c] - mean) / std * float(weights["scale"][c]) + float(weights["bias"][c])
        return [y.astype(np.float32)]


OPS: tuple[OpDef, ...] = (BatchNorm(),)

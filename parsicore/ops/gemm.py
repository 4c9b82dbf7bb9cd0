"""Gemm: a fully connected layer, ``y = x @ weight.T + bias``.

x: float32 (N, F); weight: (K, F); optional bias: (K,) -> y: float32 (N, K). Importers normalise ONNX's
alpha/beta/transA/transB into this form, so the op has no attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from parsicore.ops.base import NoAttrs, OpDef, Shape, require_rank


class GemmOp(OpDef):
    type = "Gemm"
    attrs = NoAttrs
    weights = ("weight",)
    optional_weights = ("bias",)

    def infer(self, attrs: NoAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        (shape,) = in_shapes
        require_rank(shape, 1)
        (f,) = shape
        wshape = tuple(weights["weight"])
        if len(wshape) != 2 or wshape[1] != f:
            raise ValueError(f"weight 'weight' has shape {wshape}, expected (K, {f})")
        k = wshape[0]
        if k < 1:
            raise ValueError(f"weight 'weight' has no output rows: shape {wshape}")
        if "bias" in weights and tuple(weights["bias"]) != (k,):
            raise ValueError(f"weight 'bias' has shape {tuple(weights['bias'])}, expected {(k,)}")
        return [(k,)]

    def macs(self, attrs: NoAttrs, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        k, f = weights["weight"]
        return int(k * f)

    def reference(self, attrs: NoAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One dot product per (image, output) pair, in float64."""
        x = np.asarray(inputs[0], dtype=np.float64)
        weight = np.asarray(weights["weight"], dtype=np.float64)
        n, k = x.shape[0], weight.shape[0]
        y = np.zeros((n, k))
        for i in range(n):
            for j in range(k):
                y[i, j] = np.dot(x[i], weight[j])
        if weights.get("bias") is not None:
            y += np.asarray(weights["bias"], dtype=np.float64)
        return [y.astype(np.float32)]


OPS: tuple[OpDef, ...] = (GemmOp(),)

"""Parsimonious-inference gates: LKAMGate and TopKGate compute a per-image channel mask, ChannelMask applies it.

A gate reads a feature map ``X`` (N, C, H, W) and outputs a mask (N, K) over the K output channels
("kernels") of a target conv layer; ``ChannelMask`` multiplies that layer's output (after conv -> BN ->
activation) by the mask, and the engine skips the conv's channels whose mask is 0.

- :class:`LKAMGate` (Learning Kernel-Activation Module, arXiv 1701.05221): two small conv banks,
  ``s = sigmoid(globalpool(bank2(act(bank1(X)))))`` (K,) per image, bank1 a k x k conv (padding k//2,
  stride 1) with weights ``w1`` (M, C, k, k), ``b1`` (M,), bank2 an optional 1x1 conv ``w2`` (K, M, 1, 1),
  ``b2`` (K,) (without it K = M and there is no activation). The mask is ``1.0`` (mode ``hard``) or ``s``
  (mode ``scaled``) where ``s > threshold``, else ``0.0``.
- :class:`TopKGate` (Feature Boosting and Suppression, ICLR 2019): saliency
  ``g = act(weight @ globalpool(X) + bias)`` (K,) per image; the ``ceil(keep_ratio * K)`` largest are kept
  (ties: the lower channel index wins), the mask is ``g`` (``scaled``) or ``1.0`` there, ``0.0`` elsewhere.

The references here include the switches -> mask step (threshold or top-k) with plain loops. Backend
kernels compute only the raw switches (LKAM: ``s``; TopK: ``g``) as (N, K): they never see thresholds;
:mod:`parsicore.gates` turns switches into masks at run time. ``switches()`` on the gate ops is the
reference of that kernel output (a backend built on ``reference`` must call it, not ``reference``, for
gates: re-thresholding a mask cannot honour a looser run-time threshold or keep ratio). These semantics match
:mod:`parsicore.export.torch_modules`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parsicore.ops.base import Attrs, OpDef, Shape, require_rank, require_weight_shape

GATE_ACTIVATIONS = ("relu", "none")
GATE_POOLS = ("avg", "max")
LKAM_MODES = ("hard", "scaled")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"attribute {name!r} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class LKAMGateAttrs(Attrs):
    """kernel_size: odd k of bank1 (padding k//2, stride 1); activation: between the banks (ignored with one
    bank); pool: global pooling over H, W; threshold in [0, 1]; mode: mask 1.0 (hard) or s (scaled)."""

    kernel_size: int = 1
    activation: str = "relu"
    pool: str = "avg"
    threshold: float = 0.5
    mode: str = "hard"

    def check(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"LKAMGate kernel_size must be odd and >= 1, got {self.kernel_size}")
        _check_choice("activation", self.activation, GATE_ACTIVATIONS)
        _check_choice("pool", self.pool, GATE_POOLS)
        _check_choice("mode", self.mode, LKAM_MODES)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"LKAMGate threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class TopKGateAttrs(Attrs):
    """keep_ratio in (0, 1]: fraction of the K channels kept; activation on the saliency; pool: global
    pooling over H, W; scaled: mask is the saliency (True) or 1.0 (False) on kept channels."""

    keep_ratio: float = 0.5
    activation: str = "relu"
    pool: str = "avg"
    scaled: bool = True

    def check(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"TopKGate keep_ratio must be in (0, 1], got {self.keep_ratio}")
        _check_choice("activation", self.activation, GATE_ACTIVATIONS)
        _check_choice("pool", self.pool, GATE_POOLS)


def kept_count(keep_ratio: float, k: int) -> int:
    """How many of ``k`` channels a TopKGate keeps: ceil(keep_ratio * k), at least 1 (as the torch module)."""
    return max(1, math.ceil(keep_ratio * k))


def _global_pool64(h: np.ndarray, pool: str) -> np.ndarray:
    """h: float64 (N, K, H, W) -> (N, K): mean or max over every position, plain loops over N and K."""
    n, k = h.shape[:2]
    out = np.empty((n, k))
    for i in range(n):
        for j in range(k):
            out[i, j] = h[i, j].mean() if pool == "avg" else h[i, j].max()
    return out


def lkam_switches(attrs: LKAMGateAttrs, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The LKAM switches s in float64, shape (N, K), from x: float32 (N, C, H, W)."""
    x = np.asarray(x, dtype=np.float64)
    w1 = np.asarray(weights["w1"], dtype=np.float64)
    n, _, height, width = x.shape
    k = attrs.kernel_size
    pad = k // 2
    padded = np.zeros((n, x.shape[1], height + 2 * pad, width + 2 * pad))
    padded[:, :, pad:pad + height, pad:pad + width] = x
    # bank1 as a sum over the k*k kernel offsets of a channel-mixing product with the shifted input.
    h = np.zeros((n, w1.shape[0], height, width)) + np.asarray(weights["b1"], dtype=np.float64)[None, :, None, None]
    for dy in range(k):
        for dx in range(k):
            shifted = padded[:, :, dy:dy + height, dx:dx + width]
            h += np.einsum("mc,nchw->nmhw", w1[:, :, dy, dx], shifted)
    if "w2" in weights:
        if attrs.activation == "relu":
            h = np.where(h > 0.0, h, 0.0)
        w2 = np.asarray(weights["w2"], dtype=np.float64)[:, :, 0, 0]
        h = np.einsum("km,nmhw->nkhw", w2, h) + np.asarray(weights["b2"], dtype=np.float64)[None, :, None, None]
    z = _global_pool64(h, attrs.pool)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def topk_saliency(attrs: TopKGateAttrs, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The TopK saliencies g in float64, shape (N, K), from x: float32 (N, C, H, W) or (N, C)."""
    x = np.asarray(x, dtype=np.float64)
    pooled = _global_pool64(x, attrs.pool) if x.ndim == 4 else x
    w = np.asarray(weights["weight"], dtype=np.float64)
    b = np.asarray(weights["bias"], dtype=np.float64)
    g = np.empty((x.shape[0], w.shape[0]))
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            value = float(np.dot(w[j], pooled[i])) + float(b[j])
            g[i, j] = max(value, 0.0) if attrs.activation == "relu" else value
    return g


class LKAMGate(OpDef):
    type = "LKAMGate"
    attrs = LKAMGateAttrs
    weights = ("w1", "b1")
    optional_weights = ("w2", "b2")
    is_gate = True

    def infer(self, attrs: LKAMGateAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        shape = tuple(in_shapes[0])
        require_rank(shape, 3)
        w1 = tuple(weights["w1"])
        if len(w1) != 4:
            raise ValueError(f"weight 'w1' must be (M, C, k, k), got shape {w1}")
        m = w1[0]
        require_weight_shape(weights, "w1", (m, shape[0], attrs.kernel_size, attrs.kernel_size))
        require_weight_shape(weights, "b1", (m,))
        if ("w2" in weights) != ("b2" in weights):
            raise ValueError("LKAMGate weights 'w2' and 'b2' go together")
        if "w2" not in weights:
            return [(m,)]
        w2 = tuple(weights["w2"])
        if len(w2) != 4:
            raise ValueError(f"weight 'w2' must be (K, M, 1, 1), got shape {w2}")
        require_weight_shape(weights, "w2", (w2[0], m, 1, 1))
        require_weight_shape(weights, "b2", (w2[0],))
        return [(w2[0],)]

    def macs(self, attrs: LKAMGateAttrs, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        """The banks' multiply-accumulates per image: the gate's overhead."""
        _, height, width = in_shapes[0]
        m, c, kh, kw = weights["w1"]
        total = m * c * kh * kw * height * width
        if "w2" in weights:
            total += weights["w2"][0] * m * height * width
        return int(total)

    def switches(self, attrs: LKAMGateAttrs, inputs: Sequence[np.ndarray],
                 weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, C, H, W) -> raw switches s float32 (N, K): what backend kernels output."""
        return [lkam_switches(attrs, inputs[0], weights).astype(np.float32)]

    def reference(self, attrs: LKAMGateAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, C, H, W) -> mask float32 (N, K) for ``attrs.threshold`` and ``attrs.mode``."""
        s = lkam_switches(attrs, inputs[0], weights)
        mask = np.zeros(s.shape, dtype=np.float32)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                if s[i, j] > attrs.threshold:
                    mask[i, j] = 1.0 if attrs.mode == "hard" else s[i, j]
        return [mask]


class TopKGate(OpDef):
    type = "TopKGate"
    attrs = TopKGateAttrs
    weights = ("weight", "bias")
    is_gate = True

    def infer(self, attrs: TopKGateAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        shape = tuple(in_shapes[0])
        if len(shape) not in (1, 3):
            raise ValueError(f"TopKGate input must be (N, C) or (N, C, H, W), got feature shape {shape}")
        w = tuple(weights["weight"])
        if len(w) != 2:
            raise ValueError(f"weight 'weight' must be (K, C), got shape {w}")
        require_weight_shape(weights, "weight", (w[0], shape[0]))
        require_weight_shape(weights, "bias", (w[0],))
        return [(w[0],)]

    def macs(self, attrs: TopKGateAttrs, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        """The fully connected saliency layer's multiply-accumulates per image (pooling is adds only)."""
        k, c = weights["weight"]
        return int(k * c)

    def switches(self, attrs: TopKGateAttrs, inputs: Sequence[np.ndarray],
                 weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, C, H, W) or (N, C) -> raw saliencies g float32 (N, K): what backend kernels output."""
        return [topk_saliency(attrs, inputs[0], weights).astype(np.float32)]

    def reference(self, attrs: TopKGateAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """x: float32 (N, C, H, W) or (N, C) -> mask float32 (N, K).

        Ties at the top-k boundary go to the lower channel index (a stable sort by decreasing saliency).
        """
        g = topk_saliency(attrs, inputs[0], weights)
        n, k = g.shape
        keep = kept_count(attrs.keep_ratio, k)
        mask = np.zeros((n, k), dtype=np.float32)
        for i in range(n):
            order = sorted(range(k), key=lambda j: (-g[i, j], j))
            for j in order[:keep]:
                mask[i, j] = g[i, j] if attrs.scaled else 1.0
        return [mask]


class ChannelMask(OpDef):
    """y[n, c] = x[n, c] * mask[n, c]: x (N, C, H, W) or (N, C), mask (N, C)."""

    type = "ChannelMask"
    num_inputs = (2, 2)
    channelwise = True
    keeps_zero = True

    def infer(self, attrs: Any, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        shape, mask = tuple(in_shapes[0]), tuple(in_shapes[1])
        if len(shape) not in (1, 3):
            raise ValueError(f"ChannelMask input must be (N, C) or (N, C, H, W), got feature shape {shape}")
        if mask != (shape[0],):
            raise ValueError(f"ChannelMask mask has feature shape {mask}, expected ({shape[0]},)")
        return [shape]

    def reference(self, attrs: Any, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        x, mask = inputs
        out = np.empty(x.shape, dtype=np.float32)
        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                out[i, c] = x[i, c] * mask[i, c]
        return [out]


OPS: tuple[OpDef, ...] = (LKAMGate(), TopKGate(), ChannelMask())

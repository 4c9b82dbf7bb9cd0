"""NumPy kernels of the gates: raw switches only (LKAM: s after the sigmoid; TopK: saliency g), and ChannelMask.

Gate kernels write (N, K) switches and never see thresholds or keep ratios: :mod:`parsicore.gates` turns
switches into masks. The LKAM kernel takes the cheapest exact path for its attributes:

- ``pool_input_first``: avg pooling, 1x1 bank1 and nothing non-linear before the pool (one bank, or two
  with activation ``none``): the banks commute with the average, so they run on the pooled (N, C) vector.
- otherwise bank1 runs on every pixel (a 1x1 matmul, or im2col + matmul for k x k), then the activation;
  with avg pooling bank2 (linear) runs after the pool, with max pooling on every pixel before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Activation, Kernel, KernelSpec, apply_activation

_SIGMOID = Activation("sigmoid")


def _refuse_epilogue(spec: KernelSpec) -> None:
    if spec.activation is not None:
        raise ValueError(f"{spec.op} kernels take no fused activation")


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """x: float32 (N, C, H, W) -> columns float32 (N, C*k*k, H*W) of a k x k, stride 1, padding k//2 conv.

    Row order (c, dy, dx) matches a weight (M, C, k, k) reshaped to (M, C*k*k).
    """
    n, c, height, width = x.shape
    pad = k // 2
    padded = np.zeros((n, c, height + 2 * pad, width + 2 * pad), dtype=np.float32)
    padded[:, :, pad:pad + height, pad:pad + width] = x
    cols = np.empty((n, c, k, k, height, width), dtype=np.float32)
    for dy in range(k):
        for dx in range(k):
            cols[:, :, dy, dx] = padded[:, :, dy:dy + height, dx:dx + width]
    return cols.reshape(n, c * k * k, height * width)


def _global_pool(h: np.ndarray, pool: str) -> np.ndarray:
    """h: float32 (N, K, P) -> (N, K), mean or max over the P positions."""
    return h.mean(axis=2, dtype=np.float32) if pool == "avg" else h.max(axis=2)


def make_lkam_gate(spec: KernelSpec) -> Kernel:
    """x: float32 (N, C, H, W) -> switches s: float32 (N, K) = sigmoid(globalpool(bank2(act(bank1(x)))))."""
    _refuse_epilogue(spec)
    attrs = spec.attrs
    k = attrs.kernel_size
    c, height, width = spec.in_shapes[0]
    w1 = np.ascontiguousarray(np.asarray(spec.weights["w1"], dtype=np.float32).reshape(-1, c * k * k))
    b1 = np.asarray(spec.weights["b1"], dtype=np.float32)
    two_banks = "w2" in spec.weights
    if two_banks:
        w2 = np.ascontiguousarray(np.asarray(spec.weights["w2"], dtype=np.float32).reshape(len(spec.weights["b2"]), -1))
        b2 = np.asarray(spec.weights["b2"], dtype=np.float32)
    relu_between = two_banks and attrs.activation == "relu"
    pool_input_first = attrs.pool == "avg" and k == 1 and not relu_between

    def lkam_gate(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = inputs[0]
        n = x.shape[0]
        out = outputs[0]
        if pool_input_first:
            z = x.reshape(n, c, height * width).mean(axis=2, dtype=np.float32) @ w1.T + b1
            if two_banks:
                z = z @ w2.T + b2
        else:
            cols = x.reshape(n, c, height * width) if k == 1 else im2col(x, k)
            h = np.matmul(w1, cols)  # (N, M, H*W)
            h += b1[:, None]
            if relu_between:
                np.maximum(h, 0.0, out=h)
            if not two_banks:
                z = _global_pool(h, attrs.pool)
            elif attrs.pool == "avg":
                z = _global_pool(h, "avg") @ w2.T + b2
            else:
                h2 = np.matmul(w2, h)
                h2 += b2[:, None]
                z = _global_pool(h2, "max")
        out[...] = z
        apply_activation(out, _SIGMOID)

    return lkam_gate


def make_topk_gate(spec: KernelSpec) -> Kernel:
    """x: float32 (N, C, H, W) or (N, C) -> saliencies g: float32 (N, K) = act(weight @ globalpool(x) + bias)."""
    _refuse_epilogue(spec)
    attrs = spec.attrs
    weight_t = np.ascontiguousarray(np.asarray(spec.weights["weight"], dtype=np.float32).T)  # (C, K)
    bias = np.asarray(spec.weights["bias"], dtype=np.float32)
    image = len(spec.in_shapes[0]) == 3

    def topk_gate(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = inputs[0]
        pooled = _global_pool(x.reshape(x.shape[0], x.shape[1], -1), attrs.pool) if image else x
        out = outputs[0]
        np.matmul(pooled, weight_t, out=out)
        out += bias
        if attrs.activation == "relu":
            np.maximum(out, 0.0, out=out)

    return topk_gate


def make_channel_mask(spec: KernelSpec) -> Kernel:
    """x: float32 (N, C, H, W) or (N, C), mask: float32 (N, C) -> x * mask per channel."""
    trailing = (1,) * (len(spec.in_shapes[0]) - 1)
    epilogue = spec.activation

    def channel_mask(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, mask = inputs
        np.multiply(x, mask.reshape(mask.shape + trailing), out=outputs[0])
        apply_activation(outputs[0], epilogue)

    return channel_mask


FACTORIES = {"LKAMGate": make_lkam_gate, "TopKGate": make_topk_gate, "ChannelMask": make_channel_mask}

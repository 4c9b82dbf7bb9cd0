"""Gates with Numba: the LKAM gate's switches in one call, and ChannelMask.

LKAM (bank1 1x1 only; other kernel sizes keep the NumPy kernel): per image, bank1 on every pixel, the
activation, the global pool and bank2, then the sigmoid, in one compiled call instead of the NumPy
kernel's half-dozen array operations and temporaries (which dominate at the gates' small sizes).

ChannelMask: hard masks are 0/1, and a gated conv has already written its inactive channels as 0, so most
of the NumPy kernel's multiply is a copy or a rewrite of zeros; here channel c of image n is zero-filled
when mask[n, c] == 0, copied when it is 1, multiplied otherwise (scaled masks). Small inputs (below
:data:`NUMPY_BELOW` elements per image) and masks with a fused activation keep the NumPy kernel. The top-k
gate stays NumPy (a small matmul on the pooled vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from parsicore.kernels import numpy_backend
from parsicore.kernels.base import Kernel, KernelContext, KernelSpec
from parsicore.kernels.numba_backend.epilogue import sigmoid_value
from parsicore.kernels.numba_backend.parallel import jit, serial_and_parallel

#: Below this many elements per image NumPy's single multiply is as fast as the per-channel loop.
NUMPY_BELOW = 100_000


@serial_and_parallel
def _channel_mask_kernel(x, mask, out):
    """x: float32 (N, C, P); mask: float32 (N, C) -> out: float32 (N, C, P) = x * mask[:, :, None]."""
    n_images, c_count, p = x.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        m = mask[n, c]
        dst = out[n, c]
        if m == 0.0:
            dst[:] = 0.0
        elif m == 1.0:
            src = x[n, c]
            for i in range(p):
                dst[i] = src[i]
        else:
            src = x[n, c]
            for i in range(p):
                dst[i] = src[i] * m


@jit
def _lkam_kernel(x, w1, b1, w2, b2, two_banks, relu_between, use_max, out):
    """x: float32 (N, C, P); w1: (M, C); b1: (M,); w2: (K, M); b2: (K,) -> out: float32 (N, K) =
    sigmoid(pool(bank2(act(bank1(x))))), with bank2 after an average pool (it is linear, so it commutes)."""
    n_images, c_count, p = x.shape
    hidden = w1.shape[0]
    h = np.empty((hidden, p), dtype=np.float32)
    # bank1 with flat unsigned indices, four input channels per pass over a hidden row: a view per (hidden
    # row, channel) cost a reference count each, which was most of the gate's time at 14x14 and below.
    u = np.uint64
    up = u(p)
    xf = x.reshape(-1)
    hf = h.reshape(-1)
    quads = c_count // 4
    for n in range(n_images):
        image = u(n) * u(c_count) * up
        for j in range(hidden):
            row = u(j) * up
            for i in range(up):
                hf[row + i] = b1[j]
            for q in range(quads):
                c = 4 * q
                s0 = image + u(c) * up
                s1 = s0 + up
                s2 = s1 + up
                s3 = s2 + up
                a0 = w1[j, c]
                a1 = w1[j, c + 1]
                a2 = w1[j, c + 2]
                a3 = w1[j, c + 3]
                for i in range(up):
                    hf[row + i] += a0 * xf[s0 + i] + a1 * xf[s1 + i] + a2 * xf[s2 + i] + a3 * xf[s3 + i]
            for c in range(4 * quads, c_count):
                s0 = image + u(c) * up
                a0 = w1[j, c]
                for i in range(up):
                    hf[row + i] += a0 * xf[s0 + i]
            if relu_between:
                for i in range(up):
                    v = hf[row + i]
                    hf[row + i] = np.float32(0.0) if v < 0 else v
        if not two_banks:
            for j in range(hidden):
                out[n, j] = _pool(h[j], use_max)
        elif not use_max:
            pooled = np.empty(hidden, dtype=np.float32)
            for j in range(hidden):
                pooled[j] = _pool(h[j], False)
            for k in range(w2.shape[0]):
                acc = b2[k]
                for j in range(hidden):
                    acc += w2[k, j] * pooled[j]
                out[n, k] = acc
        else:
            row2 = np.empty(p, dtype=np.float32)
            for k in range(w2.shape[0]):
                row2[:] = b2[k]
                for j in range(hidden):
                    weight = w2[k, j]
                    src = h[j]
                    for i in range(p):
                        row2[i] += weight * src[i]
                out[n, k] = _pool(row2, True)
        for k in range(out.shape[1]):
            out[n, k] = sigmoid_value(out[n, k])


@jit
def _pool(row, use_max):
    """The mean (float32 sum / count) or the max (NaN propagates) of a float32 row."""
    if use_max:
        best = row[0]
        for i in range(1, row.shape[0]):
            v = row[i]
            if v > best or v != v:
                best = v
        return best
    acc = np.float32(0.0)
    for i in range(row.shape[0]):
        acc += row[i]
    return acc / np.float32(row.shape[0])


def make_lkam_gate(spec: KernelSpec) -> Kernel:
    """Factory. x: float32 (N, C, H, W) -> switches float32 (N, K); NumPy's kernel unless bank1 is 1x1."""
    if spec.activation is not None or spec.attrs.kernel_size != 1:
        return numpy_backend.gates.make_lkam_gate(spec)
    attrs = spec.attrs
    c = spec.in_shapes[0][0]
    w1 = np.ascontiguousarray(np.asarray(spec.weights["w1"], dtype=np.float32).reshape(-1, c))
    b1 = np.ascontiguousarray(spec.weights["b1"], dtype=np.float32)
    two_banks = "w2" in spec.weights
    if two_banks:
        w2 = np.ascontiguousarray(np.asarray(spec.weights["w2"], dtype=np.float32).reshape(len(spec.weights["b2"]), -1))
        b2 = np.ascontiguousarray(spec.weights["b2"], dtype=np.float32)
    else:
        w2 = np.zeros((1, 1), dtype=np.float32)
        b2 = np.zeros(1, dtype=np.float32)
    relu_between = two_banks and attrs.activation == "relu"
    use_max = attrs.pool == "max"

    def lkam_gate(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = inputs[0]
        n = x.shape[0]
        x3 = np.ascontiguousarray(x, dtype=np.float32).reshape(n, c, -1)
        _lkam_kernel(x3, w1, b1, w2, b2, two_banks, relu_between, use_max, outputs[0])

    return lkam_gate


def make_channel_mask(spec: KernelSpec) -> Kernel:
    """Factory. x: float32 (N, C, ...), mask: float32 (N, C) -> x * mask per channel."""
    features = int(np.prod(spec.in_shapes[0]))
    if spec.activation is not None or features < NUMPY_BELOW or len(spec.in_shapes[0]) < 2:
        return numpy_backend.gates.make_channel_mask(spec)
    c = spec.in_shapes[0][0]
    context: KernelContext = spec.kernel_context()

    def channel_mask(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, mask = inputs
        n = x.shape[0]
        x3 = np.ascontiguousarray(x, dtype=np.float32).reshape(n, c, -1)
        mask = np.ascontiguousarray(mask, dtype=np.float32).reshape(n, c)
        out = outputs[0]
        _channel_mask_kernel(context.threads, out.size, x3, mask, out.reshape(n, c, -1))

    return channel_mask


FACTORIES = {"LKAMGate": make_lkam_gate, "ChannelMask": make_channel_mask}

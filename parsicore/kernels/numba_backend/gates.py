"""Gates with Numba: the LKAM gate's switches in one call, and ChannelMask.

LKAM (bank1 1x1 only; other kernel sizes keep the NumPy kernel): per image, bank1 on every pixel as one
BLAS product (w1 @ x into scratch), then its bias, the activation, the global pool, bank2 and the sigmoid in
one compiled call instead of the NumPy kernel's half-dozen array operations and temporaries (which dominate
at the gates' small sizes). A compiled bank1 loop ran at 8-16 GMAC/s at the gates' shapes (C 16-320, 7x7 to
112x112, 4-48 hidden), BLAS 3-5x faster there (1.4x at 4 hidden rows of 112x112, its worst case).

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
def _lkam_finish(h, b1, w2, b2, two_banks, relu_between, use_max, out):
    """One image's switches from its bank1 products. h: float32 (M, P), w1 @ x (overwritten: + b1, then the
    activation between the banks); b1: (M,); w2: (K, M); b2: (K,) -> out: float32 (K,) =
    sigmoid(pool(bank2(act(h + b1)))), with bank2 after an average pool (it is linear, so it commutes)."""
    hidden, p = h.shape
    u = np.uint64
    up = u(p)
    hf = h.reshape(-1)
    # Flat unsigned indices, no row views: a view costs a reference count each (most of a small gate's time).
    for j in range(hidden):
        row = u(j) * up
        bias = b1[j]
        if relu_between:
            for i in range(up):
                v = hf[row + i] + bias
                hf[row + i] = np.float32(0.0) if v < 0 else v
        else:
            for i in range(up):
                hf[row + i] += bias
    if not two_banks:
        for j in range(hidden):
            out[j] = _pool(h[j], use_max)
    elif not use_max:
        pooled = np.empty(hidden, dtype=np.float32)
        for j in range(hidden):
            pooled[j] = _pool(h[j], False)
        for k in range(w2.shape[0]):
            acc = b2[k]
            for j in range(hidden):
                acc += w2[k, j] * pooled[j]
            out[k] = acc
    else:
        row2 = np.empty(p, dtype=np.float32)
        for k in range(w2.shape[0]):
            row2[:] = b2[k]
            for j in range(hidden):
                weight = w2[k, j]
                src = h[j]
                for i in range(p):
                    row2[i] += weight * src[i]
            out[k] = _pool(row2, True)
    for k in range(out.shape[0]):
        out[k] = sigmoid_value(out[k])


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

    hidden = w1.shape[0]
    context: KernelContext = spec.kernel_context()

    def lkam_gate(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x = inputs[0]
        n = x.shape[0]
        x3 = np.ascontiguousarray(x, dtype=np.float32).reshape(n, c, -1)
        (flat,) = context.scratch(hidden * x3.shape[2])
        h = flat.reshape(hidden, x3.shape[2])
        out = outputs[0]
        for i in range(n):
            np.matmul(w1, x3[i], out=h)  # bank1: BLAS, 3-5x the compiled loop's speed at the gates' shapes
            _lkam_finish(h, b1, w2, b2, two_banks, relu_between, use_max, out[i])

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

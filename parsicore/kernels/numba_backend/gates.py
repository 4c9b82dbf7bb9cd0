"""Gates with Numba: the LKAM gate's switches in one call, and ChannelMask.

LKAM (bank1 1x1 only; other kernel sizes keep the NumPy kernel). On inputs of FUSED_MIN_PIXELS pixels or
more, where the row GEMM's microkernel runs (row_gemm.ENABLED), unless the pool is a max after bank2: bank1,
its bias, the activation and the global pool in one pass (:func:`_bank1_pool_kernel`). The microkernel
computes a tile of the hidden rows by 64 pixels, and the tile is pooled where it lies (per-lane partial sums or
maxima), so bank1's output (hidden x pixels) is never written to memory and the input is read once.
Elsewhere, per image, bank1 on every pixel as one BLAS product (w1 @ x into scratch), then its bias, the
activation, the global pool, bank2 and the sigmoid in one compiled call instead of the NumPy kernel's
half-dozen array operations and temporaries (which dominate at the gates' small sizes). A plain compiled
bank1 loop ran at 8-16 GMAC/s at the gates' shapes (C 16-320, 7x7 to 112x112, 4-48 hidden), BLAS 3-5x
faster there (1.4x at 4 hidden rows of 112x112, its worst case).

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
from parsicore.kernels.numba_backend import row_gemm
from parsicore.kernels.numba_backend.epilogue import sigmoid_value
from parsicore.kernels.numba_backend.parallel import chunk_bounds, jit, serial_and_parallel
from parsicore.kernels.numba_backend.row_gemm import COLUMNS, ROWS

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
    if not use_max or not two_banks:
        pooled = np.empty(hidden, dtype=np.float32)
        for j in range(hidden):
            pooled[j] = _pool(h[j], use_max)
        _switches_from_pooled(pooled, w2, b2, two_banks, out)
        return
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
def _switches_from_pooled(pooled, w2, b2, two_banks, out):
    """out: float32 (K,) = sigmoid(bank2(pooled)) with two banks (bank2 commutes with an average pool), else
    sigmoid(pooled); pooled: float32 (M,) bank1's pooled rows."""
    if two_banks:
        for k in range(w2.shape[0]):
            acc = b2[k]
            for j in range(pooled.shape[0]):
                acc += w2[k, j] * pooled[j]
            out[k] = acc
    else:
        for j in range(pooled.shape[0]):
            out[j] = pooled[j]
    for k in range(out.shape[0]):
        out[k] = sigmoid_value(out[k])


#: The fused bank1 runs on inputs of this many pixels or more. One-off, 1 thread, hot, against BLAS + _lkam_finish
#: (C, side, hidden = max(4, C/16)): 0.46x at (32, 112), 0.55x (16, 112), 0.70x (64, 112), 0.59-0.96x at 56x56
#: (C 24-144); at 28x28 0.81-1.16x; 1.1-1.3x slower at 14x14 and 7x7 (C 96-512), where BLAS's product is small.
FUSED_MIN_PIXELS = 2048

#: Chunks of 64-pixel column blocks the fused bank1 pools separately (then summed in order): fixed, so a gate's
#: switches are the same numbers at any thread count.
POOL_CHUNKS = 8


@serial_and_parallel
def _bank1_pool_kernel(w1, offs, x, c, p, block, b1, relu, use_max, partial):
    """One image's bank1, bias, activation and pool partials, bank1's output never stored. w1: float32 flat (M*C)
    row-major; offs: int64 (M + ROWS,) = j*C, then ROWS copies of the last (row_gemm.tile reads them ahead); x:
    float32 flat (C*P); block: K steps per pass of the microkernel (row_gemm.DEPTH); b1: (M,); partial: float32
    (chunks, M, COLUMNS) -> partial[q, j, i] = the sum (use_max: the NaN-propagating max, -inf where no pixel)
    over chunk q's pixels t = i (mod COLUMNS) of act(w1[j] @ x[:, t] + b1[j]), act ReLU when ``relu``, else
    none."""
    hidden = b1.shape[0]
    chunks = partial.shape[0]
    groups = (hidden + ROWS - 1) // ROWS
    blocks = (p + COLUMNS - 1) // COLUMNS
    u = np.uint64
    pf = partial.reshape(-1)
    start = -np.inf if use_max else 0.0
    for chunk in numba.prange(chunks):
        tiles = np.empty(groups * ROWS * COLUMNS, dtype=np.float32)
        mine = u(chunk) * u(hidden) * u(COLUMNS)
        for i in range(u(hidden) * u(COLUMNS)):
            pf[mine + i] = start
        first, stop = chunk_bounds(chunk, chunks, blocks)
        for blk in range(first, stop):
            c0 = blk * COLUMNS
            ncols = min(COLUMNS, p - c0)
            for k0 in range(0, c, block):
                for g in range(groups):
                    row_gemm.tile(min(ROWS, hidden - g * ROWS), w1, k0, offs, g * ROWS, x, k0 * p + c0, p, ncols,
                                  tiles, g * ROWS * COLUMNS, min(block, c - k0), k0 > 0)
            for j in range(hidden):
                t0 = u(j) * u(COLUMNS)
                d0 = mine + t0
                bias = b1[j]
                if use_max:
                    for i in range(u(ncols)):
                        v = tiles[t0 + i] + bias
                        if relu and v < 0:
                            v = np.float32(0.0)
                        best = pf[d0 + i]
                        pf[d0 + i] = v if (v > best or v != v) else best  # a NaN best stays: v > NaN is false
                else:
                    for i in range(u(ncols)):
                        v = tiles[t0 + i] + bias
                        if relu and v < 0:
                            v = np.float32(0.0)
                        pf[d0 + i] += v


@jit
def _pool_partials(partial, p, use_max, pooled):
    """pooled: float32 (M,) = the pool of every row of _bank1_pool_kernel's partials (chunks, then lanes, in
    order; the mean divides the sum by the ``p`` pixels)."""
    for j in range(pooled.shape[0]):
        if use_max:
            best = partial[0, j, 0]
            for q in range(partial.shape[0]):
                for i in range(partial.shape[2]):
                    v = partial[q, j, i]
                    if v > best or v != v:
                        best = v
            pooled[j] = best
        else:
            acc = np.float32(0.0)
            for q in range(partial.shape[0]):
                for i in range(partial.shape[2]):
                    acc += partial[q, j, i]
            pooled[j] = acc / np.float32(p)


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
    pixels = int(np.prod(spec.in_shapes[0][1:], dtype=np.int64))
    if row_gemm.ENABLED and pixels >= FUSED_MIN_PIXELS and not (two_banks and use_max):
        w1_flat = w1.reshape(-1)
        offs = row_gemm.row_offsets(np.arange(hidden, dtype=np.int64), c)
        chunks = min(POOL_CHUNKS, -(-pixels // COLUMNS))
        block = row_gemm.DEPTH

        def fused_lkam_gate(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
            x = inputs[0]
            n = x.shape[0]
            x3 = np.ascontiguousarray(x, dtype=np.float32).reshape(n, c * pixels)
            partial_flat, pooled = context.scratch(chunks * hidden * COLUMNS, hidden)
            partial = partial_flat.reshape(chunks, hidden, COLUMNS)
            out = outputs[0]
            for i in range(n):
                _bank1_pool_kernel(context.threads, c * pixels, w1_flat, offs, x3[i], c, pixels, block, b1,
                                   relu_between, use_max, partial)
                _pool_partials(partial, pixels, use_max, pooled)
                _switches_from_pooled(pooled, w2, b2, two_banks, out[i])

        return fused_lkam_gate

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

"""Conv with Numba: im2col, weight gathering, fused epilogue and depthwise convs; the GEMM is mostly ``np.matmul``.

Numba has no BLAS of its own without SciPy, so most GEMMs are NumPy's (OpenBLAS), called once per image by the
orchestration shared with the numpy backend (:class:`~parsicore.kernels.numpy_backend.conv.ConvKernel`:
packing, dense vs gated, scratch memory). What Numba replaces are the microkernels around it, and, at the
skinny shapes of late layers where OpenBLAS spends its time packing the weights on every call, the GEMM itself
(:mod:`~parsicore.kernels.numba_backend.packed_gemm`, on weights packed once at load, epilogue fused). Each public
function normalises its arguments (C-contiguous float32, int64 indices) and calls a private ``@njit`` kernel
that takes only arrays and scalars, never globals that could change (Numba freezes globals at compile time).

Vectorisation: LLVM vectorises a loop only when its accesses are unit-stride (or a small constant stride)
and free of Python's negative-index wrap-around; so inner loops run over slices whose bounds were clipped
beforehand (no bounds test inside), and stride-2 variants are written with the literal 2.

Depthwise ("flat planes"): per channel, the input is copied into zero-padded flat planes (one per row
phase of the vertical stride) with row pitch ``pitch``; the output is accumulated on the padded grid and
each tap is one long unit-stride loop over the whole plane instead of one short loop per row (the extra
columns are dropped when the epilogue writes the output). See _depthwise_planes_kernel. 3x3 depthwise convs with
padding 1 go further (_depthwise_3x3_flat_kernel): no padding columns at all, so the plane is one flat copy (or
one deinterleaving loop at stride 2) and the edge columns' wrapped taps are dropped by a select.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from parsicore.kernels.base import Activation, KernelContext, KernelSpec, apply_activation
from parsicore.kernels.numba_backend import blas_split, epilogue, packed_gemm, parallel, row_gemm, winograd
from parsicore.kernels.numba_backend.epilogue import (
    activate_value,
    activation_params,
    all_indices,
    bias_activation_rows,
    clamp_bounds,
    finish_row,
    finish_span,
    scatter_rows,
    zeros,
)
from parsicore.kernels.numba_backend.gather import gather_rows, zero_other_rows
from parsicore.kernels.numba_backend.parallel import chunk_bounds, chunk_count, jit, jit_inline, serial_and_parallel
from parsicore.kernels.numpy_backend.conv import (
    MODE_BIAS,
    MODE_COMPUTE,
    MODE_ZERO,
    ConvGeometry,
    ConvKernel,
    ConvMicrokernels,
    PackedGemm,
)


def _threads(context: KernelContext | None) -> int | None:
    return None if context is None else context.threads


# --- im2col --------------------------------------------------------------------------------------------


@jit
def _copy_row(src, dst):
    for t in range(dst.shape[0]):
        dst[t] = src[t]


@serial_and_parallel
def _im2col_kernel(x, channels, kh, kw, stride_h, stride_w, dil_h, dil_w, top, left, ho, wo, cols):
    """x: float32 (C, H, W); channels: int64 (S,) -> cols: float32 (S*kh*kw, ho*wo); row (s*kh+i)*kw+j.

    At stride_w 2 each input row is first split into its even and odd columns (the only strided pass);
    tap column offset ``o`` then reads parity o % 2 at ow + o // 2, a unit-stride copy like stride 1.
    Indices into the flat arrays are unsigned and no array views are made per row: a view costs a
    reference-count update, and a signed index Numba's negative-index wrap-around; with rows of 7 or 14
    elements these overheads, not the copies, were the kernel's time (measured 0.5-0.8x the time of the
    view-per-row version at ResNet-18's shapes).
    """
    _, h, w = x.shape
    n_sel = channels.shape[0]
    u = np.uint64
    half = (w + 1) // 2
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    pixels = u(ho) * u(wo)
    uwo = u(wo)
    for s in numba.prange(n_sel):
        plane_start = u(channels[s]) * u(h) * u(w)
        if stride_w == 2:
            source = np.empty(2 * h * half, dtype=np.float32)
            for ih in range(h):
                row = plane_start + u(ih) * u(w)
                even = u(ih) * u(half)
                odd = u(h * half) + even
                # Both parities in one loop (an interleaved load LLVM vectorises; one loop per parity did not).
                pairs = u(w // 2)
                for t in range(pairs):
                    source[even + t] = xf[row + u(2) * t]
                    source[odd + t] = xf[row + u(2) * t + u(1)]
                if w % 2:
                    source[even + pairs] = xf[row + u(2) * pairs]
            base = u(0)
            pitch = half
        else:
            source = xf
            base = plane_start
            pitch = w
        for i in range(kh):
            for j in range(kw):
                d_tap = u((s * kh + i) * kw + j) * pixels
                offset = j * dil_w - left
                ow_lo = max(0, (stride_w - 1 - offset) // stride_w)
                ow_hi = max(ow_lo, min(wo, (w - 1 - offset) // stride_w + 1))
                run = u(ow_hi - ow_lo)
                if stride_w == 2:
                    parity = offset % 2
                    column = u(parity * h * half + ow_lo + (offset - parity) // 2)
                else:
                    column = u(ow_lo + offset)
                for oh in range(ho):
                    d0 = d_tap + u(oh) * uwo
                    ih = oh * stride_h - top + i * dil_h
                    if ih < 0 or ih >= h or run == 0:
                        for t in range(uwo):
                            cf[d0 + t] = 0.0
                        continue
                    for t in range(u(ow_lo)):
                        cf[d0 + t] = 0.0
                    if stride_w <= 2:
                        s0 = base + u(ih) * u(pitch) + column
                        dr = d0 + u(ow_lo)
                        for t in range(run):
                            cf[dr + t] = source[s0 + t]
                    else:
                        row = plane_start + u(ih) * u(w)
                        for ow in range(ow_lo, ow_hi):
                            cf[d0 + u(ow)] = xf[row + u(ow * stride_w + offset)]
                    for t in range(u(ow_hi), uwo):
                        cf[d0 + t] = 0.0


@serial_and_parallel
def _im2col_gather_kernel(x, channels, kh, kw, stride_h, stride_w, dil_h, dil_w, top, left, ho, wo, chunks, cols):
    """As _im2col_kernel, for small maps: x: float32 (C, H, W); channels: int64 (S,) -> cols: float32
    (S*kh*kw, ho*wo).

    Per channel the input is copied into a zero-padded plane (allocated and zeroed once per chunk of channels;
    only its interior is written again, so the padding stays zero), then every element of the channel's
    kh*kw*ho*wo block is one load through an index map of the geometry (built once per call). No branch per
    row and no short row loops: with 7- or 14-element rows those were the row-copy kernel's time.
    """
    _, h, w = x.shape
    u = np.uint64
    ph = (ho - 1) * stride_h + (kh - 1) * dil_h + 1
    pw = (wo - 1) * stride_w + (kw - 1) * dil_w + 1
    rows_in = max(0, min(h, ph - top))
    cols_in = u(max(0, min(w, pw - left)))
    block = kh * kw * ho * wo
    index = np.empty(block, dtype=np.uint64)
    t = 0
    for i in range(kh):
        for j in range(kw):
            for oh in range(ho):
                for ow in range(wo):
                    index[t] = u((oh * stride_h + i * dil_h) * pw + ow * stride_w + j * dil_w)
                    t += 1
    n_sel = channels.shape[0]
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    ublock = u(block)
    for chunk in numba.prange(chunks):
        start, stop = chunk_bounds(chunk, chunks, n_sel)
        plane = np.zeros(ph * pw, dtype=np.float32)
        for s in range(start, stop):
            src = u(channels[s]) * u(h) * u(w)
            for ih in range(rows_in):
                r = src + u(ih) * u(w)
                d = u((ih + top) * pw + left)
                for t in range(cols_in):
                    plane[d + t] = xf[r + t]
            dst = u(s) * ublock
            for t in range(ublock):
                cf[dst + t] = plane[index[t]]


#: Output rows up to this many columns take the gathering im2col (measured against the row-copy kernel; see
#: im2col).
GATHER_IM2COL_MAX_WIDTH = 16


def im2col(x: np.ndarray, channels: np.ndarray | None, geom: ConvGeometry, out: np.ndarray,
           context: KernelContext | None = None) -> None:
    """As numpy_backend.conv.im2col: one image x: float32 (C, H, W) -> out: float32 (S*kh*kw, Ho*Wo)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if channels is None:
        channels = all_indices(x.shape[0])
    g = geom
    if g.wo <= GATHER_IM2COL_MAX_WIDTH:
        _im2col_gather_kernel(_threads(context), out.size, x, channels, g.kh, g.kw, g.stride_h, g.stride_w, g.dil_h,
                              g.dil_w, g.top, g.left, g.ho, g.wo, chunk_count(channels.shape[0]), out)
        return
    _im2col_kernel(_threads(context), out.size, x, channels, g.kh, g.kw, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                   g.top, g.left, g.ho, g.wo, out)


# --- blocked im2col convs on the pool ----------------------------------------------------------------------

# Serial builds called per block from the pool's threads below (a KernelPair is not callable from Numba code).
_im2col_rows = _im2col_kernel.serial
_finish_rows = bias_activation_rows.serial


@serial_and_parallel
def _blocked_conv_kernel(address, ilp64, x, channels, weights, blocks, kh, kw, stride_h, stride_w, dil_h, dil_w,
                         left, wo, bias, has_bias, code, alpha, beta, lo, hi, chunks, scratch, y):
    """One image of a blocked im2col conv, its row blocks shared out over ``chunks`` threads, each block's
    im2col, GEMM (OpenBLAS's cblas_sgemm at ``address``, see blas_split) and epilogue back to back on one thread.

    x: float32 (C, H, W) C-contiguous; channels: int64 (C,) 0..C-1; weights: float32 (K, C*kh*kw) C-contiguous;
    blocks: int64 (B, 5) per block its first input row, last + 1, first output column, last + 1 and the padding
    rows above it (numpy_backend.conv._row_blocks); scratch: float32 (chunks, >= C*kh*kw * the widest block);
    y: float32 (K, P) C-contiguous, every column written."""
    k, depth = weights.shape
    p = y.shape[1]
    u = np.uint64
    for chunk in numba.prange(chunks):
        first, last = chunk_bounds(chunk, chunks, blocks.shape[0])
        for i in range(first, last):
            r0, r1, p0, p1, top = blocks[i, 0], blocks[i, 1], blocks[i, 2], blocks[i, 3], blocks[i, 4]
            width = p1 - p0
            rows = np.ascontiguousarray(x[:, r0:r1])
            cols = scratch[chunk, : depth * width].reshape(depth, width)
            _im2col_rows(rows, channels, kh, kw, stride_h, stride_w, dil_h, dil_w, top, left, width // wo, wo, cols)
            blas_split.sgemm(address, ilp64, k, width, depth, weights.ctypes.data, depth, cols.ctypes.data, width,
                             y.ctypes.data + u(p0) * u(4), p)
            _finish_rows(y, p0, p1, bias, has_bias, code, alpha, beta, lo, hi)


def blocked_conv(x: np.ndarray, weights: np.ndarray, blocks: np.ndarray, geom: ConvGeometry, bias: np.ndarray | None,
                 act: Activation | None, y: np.ndarray, context: KernelContext) -> bool:
    """One image of a blocked im2col conv (numpy_backend.conv.ConvKernel._blocked_image) with its row blocks over
    the run's threads in Numba's pool: x float32 (C, H, W); weights float32 (K, C*kh*kw); blocks int64 (B, 5) as
    _blocked_conv_kernel; y float32 (K, Ho*Wo) C-contiguous. False, computing nothing, where it does not apply
    (no cblas_sgemm, one thread or one block, outputs narrow enough for the gathering im2col, groups)."""
    found = blas_split.sgemm_address()
    threads = context.threads
    g = geom
    if (found is None or threads is None or threads < 2 or blocks.shape[0] < 2 or g.wo <= GATHER_IM2COL_MAX_WIDTH
            or g.groups != 1 or not y.flags.c_contiguous or not weights.flags.c_contiguous):
        return False
    chunks = min(threads, blocks.shape[0])
    widest = int((blocks[:, 3] - blocks[:, 2]).max())
    depth = weights.shape[1]
    (flat,) = context.scratch(chunks * depth * widest)
    code, alpha, beta, lo, hi = activation_params(act)
    has_bias = bias is not None
    address, ilp64 = found
    _blocked_conv_kernel(threads, 1 << 62, address, ilp64, np.ascontiguousarray(x, dtype=np.float32),
                         all_indices(g.c), weights, blocks, g.kh, g.kw, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                         g.left, g.wo, bias if has_bias else zeros(g.k), has_bias, code, alpha, beta, lo, hi, chunks,
                         flat.reshape(chunks, depth * widest), y)
    return True


# --- gathers and epilogue --------------------------------------------------------------------------------


@serial_and_parallel
def _gather_weights_kernel(taps, rows, channels, out):
    """taps: float32 (K, C, T); rows: int64 (R,); channels: int64 (S,) -> out: float32 (R, S*T).

    Flat unsigned indices, no view per row or channel block: with views (a reference count each) and
    signed indices the kernel took 5.5 GB/s on ResNet-18's layer4 weights and 123 us for the default model's
    128x~40x9 gather (PERFORMANCE.md)."""
    _, c, n_taps = taps.shape
    u = np.uint64
    tf = taps.reshape(-1)
    of = out.reshape(-1)
    n_sel = channels.shape[0]
    ut = u(n_taps)
    row_length = u(n_sel) * ut
    for r in numba.prange(rows.shape[0]):
        src_row = u(rows[r]) * u(c) * ut
        dst_row = u(r) * row_length
        if n_taps == 1:  # 1x1 convs: one element per channel
            for s in range(n_sel):
                of[dst_row + u(s)] = tf[src_row + u(channels[s])]
        else:
            for s in range(n_sel):
                src = src_row + u(channels[s]) * ut
                dst = dst_row + u(s) * ut
                for t in range(ut):
                    of[dst + t] = tf[src + t]


def gather_weights(taps: np.ndarray, rows: np.ndarray | None, channels: np.ndarray | None, out: np.ndarray,
                   context: KernelContext | None = None) -> None:
    """As numpy_backend.conv.gather_weights: out (R, S*T) = taps[rows][:, channels] flattened."""
    k, c, _ = taps.shape
    if channels is None:
        gather_rows(taps.reshape(1, k, -1), rows, out.reshape(1, rows.shape[0], -1), context)
        return
    if rows is None:
        rows = all_indices(k)
    _gather_weights_kernel(_threads(context), out.size, taps, rows, channels, out)


def _bias_activation_rows(y: np.ndarray, start: int, stop: int, bias: np.ndarray | None, act: Activation | None,
                          threads: int | None, work: int, caller: str) -> None:
    """y: float32 (..., K, P), C-contiguous, in place on columns [start, stop) of every row (bias per K)."""
    code, alpha, beta, lo, hi = activation_params(act)
    if bias is None and code == 0:
        return
    if not y.flags.c_contiguous:
        raise ValueError(f"{caller} needs a C-contiguous y (it works in place)")
    k, p = y.shape[-2:]
    has_bias = bias is not None
    bias_activation_rows(threads, work, y.reshape(-1, p), start, stop, bias if has_bias else zeros(k), has_bias, code,
                         alpha, beta, lo, hi)


def bias_activation(y: np.ndarray, bias: np.ndarray | None, act: Activation | None,
                    context: KernelContext | None = None) -> None:
    """As numpy_backend.conv.bias_activation: y: float32 (N, K, P), C-contiguous, in place."""
    _bias_activation_rows(y, 0, y.shape[2], bias, act, _threads(context), y.size // epilogue.EPILOGUE_WORK_DIVISOR,
                          "bias_activation")


def bias_activation_block(y: np.ndarray, start: int, stop: int, bias: np.ndarray | None, act: Activation | None,
                          context: KernelContext | None = None) -> None:
    """As numpy_backend.conv.bias_activation_block: y: float32 (K, P), C-contiguous; columns [start, stop).
    Serial: a block is one thread's share of a blocked conv."""
    _bias_activation_rows(y, start, stop, bias, act, 1, 0, "bias_activation_block")


def scatter_bias_activation(values: np.ndarray, rows: np.ndarray, bias: np.ndarray | None, act: Activation | None,
                            y: np.ndarray, context: KernelContext | None = None) -> None:
    """As numpy_backend.conv.scatter_bias_activation: y[rows] = act(values + bias[rows]), other rows 0."""
    code, alpha, beta, lo, hi = activation_params(act)
    if not (y.flags.c_contiguous and values.flags.c_contiguous):
        raise ValueError("scatter_bias_activation needs C-contiguous values and y")
    has_bias = bias is not None
    bias = bias if has_bias else zeros(y.shape[0])
    work = y.size // epilogue.EPILOGUE_WORK_DIVISOR
    scatter_rows(_threads(context), work, values, rows, bias, has_bias, code, alpha, beta, lo, hi, y)


# --- depthwise ------------------------------------------------------------------------------------------


@jit
def _multiply_add(acc, src, weight):
    for t in range(acc.shape[0]):
        acc[t] += src[t] * weight


@jit_inline
def _fill_skipped(plane, mode, b, code, alpha, beta, lo, hi):
    """A gated depthwise output plane (float32 (Ho, Wo)) that needs no computing: 0 (MODE_ZERO) or act(bias)
    (MODE_BIAS)."""
    plane[:, :] = 0.0 if mode == MODE_ZERO else activate_value(b, code, alpha, beta, lo, hi)


@serial_and_parallel
def _depthwise_planes_kernel(x, filters, bias, modes, stride_h, stride_w, dil_h, dil_w, top, left, phase_rows,
                             pitch, code, alpha, beta, lo, hi, out):
    """x: float32 (N, C, H, W); filters: (C, kh, kw); bias: (C,); modes: int8 (N, C) -> out: (N, C, Ho, Wo).

    Per channel, the zero-padded plane is split by row into stride_h phase planes (padded row r goes to
    phase r % stride_h, row r // stride_h), each ``phase_rows`` x ``pitch``, flat. The accumulator holds
    output row oh at flat index oh*pitch and every padded column cc there (the output column ow is
    cc = ow*stride_w); tap (i, j) reads its phase plane at that index + (i*dil_h // stride_h)*pitch +
    j*dil_w: one unit-stride loop over the whole plane per tap. At stride_w > 1 the columns between
    outputs are computed and dropped: stride_w times the arithmetic, but vectorised, where strided loads
    are not (measured ~2x faster at stride 2).
    """
    n_images, c_count, h, w = x.shape
    _, kh, kw = filters.shape
    _, _, ho, wo = out.shape
    plane = phase_rows * pitch
    length = ho * pitch
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        if modes[n, c] != MODE_COMPUTE:
            _fill_skipped(out[n, c], modes[n, c], bias[c], code, alpha, beta, lo, hi)
            continue
        phases = np.zeros(stride_h * plane, dtype=np.float32)
        for ih in range(h):
            row = ih + top
            start = (row % stride_h) * plane + (row // stride_h) * pitch + left
            _copy_row(x[n, c, ih], phases[start:start + w])
        acc = np.zeros(length, dtype=np.float32)
        for i in range(kh):
            rr = i * dil_h
            base = (rr % stride_h) * plane + (rr // stride_h) * pitch
            for j in range(kw):
                offset = base + j * dil_w
                _multiply_add(acc, phases[offset:offset + length], filters[c, i, j])
        b = bias[c]
        for oh in range(ho):
            if stride_w == 1:
                finish_row(acc[oh * pitch:oh * pitch + wo], out[n, c, oh], b, code, alpha, beta, lo, hi)
            else:
                dst = out[n, c, oh]
                for ow in range(wo):
                    dst[ow] = acc[oh * pitch + ow * stride_w]
                finish_row(dst, dst, b, code, alpha, beta, lo, hi)


@jit_inline
def _nine_taps(ff, c):
    """Channel c's 3x3 filter as nine scalars (ff: float32 (C*9,), the filters flat)."""
    f0 = np.uint64(9) * np.uint64(c)
    return (ff[f0], ff[f0 + np.uint64(1)], ff[f0 + np.uint64(2)], ff[f0 + np.uint64(3)], ff[f0 + np.uint64(4)],
            ff[f0 + np.uint64(5)], ff[f0 + np.uint64(6)], ff[f0 + np.uint64(7)], ff[f0 + np.uint64(8)])


#: Output rows at least this wide take the 3x3 depthwise kernel's fused row loop (no activation, ReLU or clip),
#: else its accumulator pass. MobileNetV2's depthwise convs hot, 1 thread (one-off): 32 ch 112x112 334 -> 251 us,
#: 96 ch 112 -> 56 (stride 2) 454 -> 388, 144 ch 56x56 314 -> 259; with 28 the 28-wide ones ran 118 -> 170 us
#: (a row of 28 is 3.5 vectors: remainder loops).
FUSED_DEPTHWISE_MIN_WIDTH = 56


@serial_and_parallel
def _depthwise_3x3_kernel(x, filters, bias, modes, stride, top, left, phase_rows, pitch, chunks, fused_width, code,
                          alpha, beta, lo, hi, out):
    """3x3 taps, dilation 1, the same stride (1 or 2) both ways. x: float32 (N, C, H, W) C-contiguous;
    filters: (C, 3, 3); bias: (C,); modes: int8 (N, C) -> out: float32 (N, C, Ho, Wo) C-contiguous.

    As the planes kernel, but every output is one expression of its nine taps (one pass over the plane, not
    nine), the padded input is split into stride x stride phase planes (padded row r, column q go to phase
    (r % stride, q % stride) at row r // stride, column q // stride), so at stride 2 every tap is a
    unit-stride read and only the kept outputs are computed, and the planes are allocated once per chunk of
    channels: their zero padding is never written, so it stays zero from one channel to the next. Indices
    are unsigned: Numba then drops the negative-index wrap-around that stops LLVM from vectorising. Without an
    activation, with ReLU or clip, output rows of ``fused_width`` or more go straight from the taps to out.
    """
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    u = np.uint64
    s = u(stride)
    p = u(pitch)
    plane = u(phase_rows) * p
    length = u(ho) * p
    xf = x.reshape(-1)
    ff = filters.reshape(-1)
    of = out.reshape(-1)
    tasks = n_images * c_count
    # Tap (i, j) reads phase (i % s, j % s) at row i // s, column j // s of the output's own position.
    o0 = u(0)
    o1 = ((u(1) % s) * plane + u(1) // s)
    o2 = ((u(2) % s) * plane + u(2) // s)
    o3 = (u(1) % s) * s * plane + (u(1) // s) * p
    o4 = o3 + o1
    o5 = o3 + o2
    o6 = (u(2) % s) * s * plane + (u(2) // s) * p
    o7 = o6 + o1
    o8 = o6 + o2
    clamps, lo_f, hi_f = clamp_bounds(code, lo, hi)
    clamped = clamps and wo >= fused_width
    for chunk in numba.prange(chunks):
        phases = np.zeros(int(s * s * plane), dtype=np.float32)
        acc = np.empty(int(length), dtype=np.float32)
        start, stop = chunk_bounds(chunk, chunks, tasks)
        for task in range(start, stop):
            n = task // c_count
            c = task % c_count
            if modes[n, c] != MODE_COMPUTE:
                _fill_skipped(out[n, c], modes[n, c], bias[c], code, alpha, beta, lo, hi)
                continue
            source = u(task) * u(h) * u(w)
            for ih in range(h):
                r = u(ih + top)
                row = (r % s) * s * plane + (r // s) * p
                src = source + u(ih) * u(w)
                if stride == 1:
                    dst = row + u(left)
                    for q in range(w):
                        ph_index = dst + u(q)
                        phases[ph_index] = xf[src + u(q)]
                else:
                    # input column 2t + e lands on padded column 2t + e + left: phase (e + left) % 2,
                    # column t + (e + left) // 2. Both column phases in one loop with the literal stride 2 (an
                    # interleaved load LLVM vectorises; one loop per phase with the run-time stride did not).
                    col = u(left)
                    dst_even = row + (col % u(2)) * plane + col // u(2)  # input columns 2t
                    col = u(1 + left)
                    dst_odd = row + (col % u(2)) * plane + col // u(2)  # input columns 2t + 1
                    pairs = w // 2
                    for t in range(u(pairs)):
                        phases[dst_even + t] = xf[src + u(2) * t]
                        phases[dst_odd + t] = xf[src + u(2) * t + u(1)]
                    if w % 2:
                        phases[dst_even + u(pairs)] = xf[src + u(2) * u(pairs)]
            w0, w1, w2, w3, w4, w5, w6, w7, w8 = _nine_taps(ff, c)
            if clamped:
                # No activation, ReLU or clip on rows of ``fused_width`` or more: each output row straight
                # from its taps, bias and clamp (finish_span's selects), no accumulator pass and no copy-out.
                b = bias[c]
                d = u(task) * u(ho) * u(wo)
                for oh in range(ho):
                    a = u(oh) * p
                    for ow in range(u(wo)):
                        q = a + ow
                        v = (w0 * phases[q + o0] + w1 * phases[q + o1] + w2 * phases[q + o2]
                             + w3 * phases[q + o3] + w4 * phases[q + o4] + w5 * phases[q + o5]
                             + w6 * phases[q + o6] + w7 * phases[q + o7] + w8 * phases[q + o8]) + b
                        of[d + ow] = lo_f if v < lo_f else (hi_f if v > hi_f else v)
                    d += u(wo)
                continue
            for q in range(length):
                acc[q] = (w0 * phases[q + o0] + w1 * phases[q + o1] + w2 * phases[q + o2]
                          + w3 * phases[q + o3] + w4 * phases[q + o4] + w5 * phases[q + o5]
                          + w6 * phases[q + o6] + w7 * phases[q + o7] + w8 * phases[q + o8])
            # The epilogue on the whole accumulator (its padding columns too) in one pass, then the output
            # rows copied out by flat index: a finish per row through two row views cost a reference-count
            # update each, most of the time of a 7x7 or 14x14 plane.
            finish_row(acc, acc, bias[c], code, alpha, beta, lo, hi)
            d = u(task) * u(ho) * u(wo)
            for oh in range(ho):
                a = u(oh) * p
                for ow in range(wo):
                    of[d + u(ow)] = acc[a + u(ow)]
                d += u(wo)


@jit_inline
def _edge_masks(rows, pitch, first, last, left_ok, right_ok):
    """left_ok / right_ok: bool (rows * pitch,) set to whether flat position o's column o % pitch is not
    ``first`` / not ``last`` (row by row: a modulo per element would cost more than the pass it serves)."""
    for r in range(rows):
        left_ok[r * pitch:(r + 1) * pitch] = True
        right_ok[r * pitch:(r + 1) * pitch] = True
        left_ok[r * pitch + first] = False
        right_ok[r * pitch + last] = False


@jit_inline
def _flat_taps(e, o, w, w0, w1, w2, w3, w4, w5, w6, w7, w8, left_ok, right_ok):
    """The stride-1 flat kernel's nine taps of output o (unsigned; e: the plane at offset w + 1, pitch w)."""
    q = o + np.uint64(1)  # e[q] is input (y - 1, x): tap (i, j) at q + i*w + j - 1
    w_2 = w + w
    v = w1 * e[q] + w4 * e[q + w] + w7 * e[q + w_2]
    left = w0 * e[q - np.uint64(1)] + w3 * e[q + w - np.uint64(1)] + w6 * e[q + w_2 - np.uint64(1)]
    right = w2 * e[q + np.uint64(1)] + w5 * e[q + w + np.uint64(1)] + w8 * e[q + w_2 + np.uint64(1)]
    zero = np.float32(0.0)
    return v + (left if left_ok else zero) + (right if right_ok else zero)


@jit_inline
def _deinterleaved_taps(e, od, q, wo, w0, w1, w2, w3, w4, w5, w6, w7, w8, left_ok):
    """The stride-2 flat kernel's nine taps at position q (unsigned) of the even- and odd-column buffers."""
    v = w4 * e[q] + w7 * e[q + wo] + w1 * e[q - wo] + w5 * od[q] + w8 * od[q + wo] + w2 * od[q - wo]
    one = np.uint64(1)
    left = w3 * od[q - one] + w6 * od[q + wo - one] + w0 * od[q - wo - one]
    return v + (left if left_ok else np.float32(0.0))


@serial_and_parallel
def _depthwise_3x3_flat_kernel(x, filters, bias, channels, modes, stride, chunks, code, alpha, beta, lo, hi, out):
    """As _depthwise_3x3_flat_planes (same arguments), its planes (n*C + c) cut into ``chunks`` runs, each run one
    call of it. Numba's parallel build of the planes loop itself ran ~2x slower than its serial build, even on one
    thread (32 x 112x112: 340 against 163 us; 192 x 28x28: 102 against 56; a one-off harness calling the two builds
    directly); a serial build called per run keeps its speed. 2 threads against 1 now (python
    scripts/bench_kernels.py --only two_threads, three runs on the Zen 4 VM, the second vCPU's share changing
    between them): 32 x 112x112 0.64-1.07, 144 x 56x56 0.62-1.00, 192 x 28x28 0.77-1.09, 384 x 14x14 0.94-1.18."""
    n_images, c_count, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    tasks = n_images * c_count
    planes_in = x.reshape(-1)
    planes_out = out.reshape(-1)
    task_channels = np.empty(tasks, dtype=np.int64)
    task_modes = np.empty(tasks, dtype=np.int8)
    for t in range(tasks):
        task_channels[t] = channels[t % c_count]
        task_modes[t] = modes[t // c_count, t % c_count]
    for chunk in numba.prange(chunks):
        t0, t1 = chunk_bounds(chunk, chunks, tasks)
        if t1 > t0:
            _depthwise_3x3_flat_planes(planes_in[t0 * h * w:t1 * h * w].reshape(1, t1 - t0, h, w), filters, bias,
                                       task_channels[t0:t1], task_modes[t0:t1].reshape(1, t1 - t0), stride, 1, code,
                                       alpha, beta, lo, hi,
                                       planes_out[t0 * ho * wo:t1 * ho * wo].reshape(1, t1 - t0, ho, wo))


@jit
def _depthwise_3x3_flat_planes(x, filters, bias, channels, modes, stride, chunks, code, alpha, beta, lo, hi, out):
    """3x3 taps, dilation 1, padding 1 above and to the left; stride 1 (out (Ho, Wo) = (H, W)) or 2 (W even,
    Wo = W / 2, any Ho: rows past the input read zeros). x: float32 (N, C, H, W) C-contiguous; filters:
    (F, 3, 3); bias: (F,); channels: int64 (C,), plane c's filter and bias (< F: a gated conv's active
    channels, read in place); modes: int8 (N, C) -> out: float32 (N, C, Ho, Wo) C-contiguous.

    No per-row loops on the input side: every plane pass is one unit-stride loop over a whole flat plane,
    so 7x7 and 14x14 planes vectorise as well as large ones.

    Stride 1: the plane is copied whole into a flat buffer at offset W + 1 behind one zero row (and followed
    by one), pitch W, no padding columns; output o reads the buffer at o + i*W + j. The left taps (j = 0) of
    column 0 and the right taps (j = 2) of column W - 1 read the neighbouring row's end instead of padding;
    they are dropped by a select (not a multiply by 0: the wrapped value may be inf or NaN), and each output
    is written once, straight to out.

    Stride 2: padded row 2y + i - 1, column 2x + j - 1. With W even, a flat index's parity is its column's,
    so one deinterleaving loop over the plane gives E[k] = x[2k] (even columns) and O[k] = x[2k + 1] (odd);
    in E, each pair of rows (2y, 2y + 1) is the run [row 2y's even columns | row 2y + 1's], W long. On the
    grid g = y*W + x (x < W, only x < Wo kept) every tap is then unit-stride: rows 2y / 2y + 1 / 2y - 1 are
    E or O at g / g + Wo / g - Wo, the column left of 2x is O at - 1. The grid's right halves (x >= Wo) are
    computed and dropped as the rows are copied out.
    """
    n_images, c_count, h, w = x.shape
    _, _, ho, wo = out.shape
    u = np.uint64
    uw = u(w)
    uwo = u(wo)
    hw = u(h) * uw
    how = u(ho) * uwo
    xf = x.reshape(-1)
    ff = filters.reshape(-1)
    of = out.reshape(-1)
    tasks = n_images * c_count
    clamps, lo_f, hi_f = clamp_bounds(code, lo, hi)
    if stride == 1:
        grid = hw
        lead = uw + u(1)  # one zero row and the left neighbour of the first element
        size = lead + grid + uw + u(1)
    else:
        grid = u(ho) * uw
        lead = uwo + u(1)
        size = lead + grid + uwo + u(1)
    grid_n = np.int64(grid)  # signed: Numba unifies int64 and uint64 as float64
    size_n = np.int64(size)
    second_n = 0 if stride == 1 else size_n  # stride 2's O buffer and accumulator
    acc_n = 0 if stride == 1 else grid_n
    left_ok = np.empty(grid_n, dtype=np.bool_)
    right_ok = np.empty(grid_n, dtype=np.bool_)
    _edge_masks(grid_n // w, w, 0, w - 1, left_ok, right_ok)
    for chunk in numba.prange(chunks):
        # Zeroed once per chunk: only the plane's own positions are ever written, so the rest stays zero.
        e = np.zeros(size_n, dtype=np.float32)
        od = np.zeros(second_n, dtype=np.float32)
        acc = np.empty(acc_n, dtype=np.float32)
        start, stop = chunk_bounds(chunk, chunks, tasks)
        for task in range(start, stop):
            n = task // c_count
            c = task % c_count
            fc = channels[c]
            if modes[n, c] != MODE_COMPUTE:
                _fill_skipped(out[n, c], modes[n, c], bias[fc], code, alpha, beta, lo, hi)
                continue
            src = u(task) * hw
            w0, w1, w2, w3, w4, w5, w6, w7, w8 = _nine_taps(ff, fc)
            b = bias[fc]
            d = u(task) * how
            if stride == 1:
                for q in range(hw):
                    e[lead + q] = xf[src + q]
                # The same loop twice (clamp inline, or raw sums and finish_span after): LLVM did not unswitch
                # a branch inside it, which cost ~10 %.
                if clamps:
                    for o in range(grid):
                        v = _flat_taps(e, o, uw, w0, w1, w2, w3, w4, w5, w6, w7, w8, left_ok[o], right_ok[o]) + b
                        of[d + o] = lo_f if v < lo_f else (hi_f if v > hi_f else v)
                else:
                    for o in range(grid):
                        of[d + o] = _flat_taps(e, o, uw, w0, w1, w2, w3, w4, w5, w6, w7, w8, left_ok[o], right_ok[o])
                    finish_span(of, d, of, d, how, b, code, alpha, beta, lo, hi)
                continue
            half = hw // u(2)
            for k in range(half):
                e[lead + k] = xf[src + u(2) * k]
                od[lead + k] = xf[src + u(2) * k + u(1)]
            if clamps:
                for g in range(grid):
                    v = _deinterleaved_taps(e, od, lead + g, uwo, w0, w1, w2, w3, w4, w5, w6, w7, w8, left_ok[g]) + b
                    acc[g] = lo_f if v < lo_f else (hi_f if v > hi_f else v)
            else:
                for g in range(grid):
                    acc[g] = _deinterleaved_taps(e, od, lead + g, uwo, w0, w1, w2, w3, w4, w5, w6, w7, w8, left_ok[g])
            for y in range(u(ho)):
                a = y * uw
                if clamps:
                    for t in range(uwo):
                        of[d + t] = acc[a + t]
                else:
                    finish_span(acc, a, of, d, uwo, b, code, alpha, beta, lo, hi)
                d += uwo


#: Channels per block of the channels-last depthwise kernel: 4 AVX-512 registers of float32. A literal in
#: the loops below (Numba compiles module constants in), so LLVM sees a fixed trip count and vectorises
#: without remainder loops; a block with fewer channels is padded with zeros.
CHANNEL_BLOCK = 64


@jit_inline
def _multiply_add_block(acc, src, weights):
    for t in range(CHANNEL_BLOCK):
        acc[t] += src[t] * weights[t]


@serial_and_parallel
def _depthwise_blocks_kernel(x, filters_t, bias, compute, stride_h, stride_w, dil_h, dil_w, top, left, kh, kw,
                             code, alpha, beta, lo, hi, out):
    """x: float32 (C, H, W), one image; filters_t: (kh*kw, C); bias: (C,); compute: int64 (S,) the channels
    to compute -> out: float32 (C, Ho, Wo), written at those channels only.

    Channels-last on blocks of CHANNEL_BLOCK computed channels: transpose the block's planes to (H*W, block),
    accumulate every output pixel as block-long vector multiply-adds (one per tap: unit-stride over
    channels, whatever the plane size or stride), then transpose back through the epilogue. For small
    planes (14x14, 7x7), whose rows are too short for the planes kernel's loops to vectorise well.
    """
    _, h, w = x.shape
    _, ho, wo = out.shape
    n_sel = compute.shape[0]
    n_blocks = (n_sel + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for blk in numba.prange(n_blocks):
        s0 = blk * CHANNEL_BLOCK
        cb = min(CHANNEL_BLOCK, n_sel - s0)
        chans = compute[s0:s0 + cb]
        xt = np.zeros((h * w, CHANNEL_BLOCK), dtype=np.float32)
        ft = np.zeros((kh * kw, CHANNEL_BLOCK), dtype=np.float32)
        acc = np.empty((ho * wo, CHANNEL_BLOCK), dtype=np.float32)
        for p in range(h * w):
            dst = xt[p]
            ih = p // w
            iw = p - ih * w
            for s in range(cb):
                dst[s] = x[chans[s], ih, iw]
        for t in range(kh * kw):
            for s in range(cb):
                ft[t, s] = filters_t[t, chans[s]]
        for oh in range(ho):
            for ow in range(wo):
                a = acc[oh * wo + ow]
                for t in range(CHANNEL_BLOCK):
                    a[t] = 0.0
                for i in range(kh):
                    ih = oh * stride_h - top + i * dil_h
                    if ih < 0 or ih >= h:
                        continue
                    for j in range(kw):
                        iw = ow * stride_w - left + j * dil_w
                        if iw < 0 or iw >= w:
                            continue
                        _multiply_add_block(a, xt[ih * w + iw], ft[i * kw + j])
        for s in range(cb):
            c = chans[s]
            b = bias[c]
            dst = out[c]
            for oh in range(ho):
                row = dst[oh]
                for ow in range(wo):
                    row[ow] = acc[oh * wo + ow, s]
                finish_row(row, row, b, code, alpha, beta, lo, hi)


#: Output planes of at most this many pixels take the channels-last blocks kernel (measured on Zen 4:
#: blocks win at 7x7 outputs, planes from 14x14 up).
SMALL_PLANE = 64


@functools.lru_cache(maxsize=64)
def _all_compute(n: int, c: int) -> np.ndarray:
    """int8 (n, c) of MODE_COMPUTE: a dense call's modes (cached and shared like all_indices: np.full cost ~1 us
    a call)."""
    return np.full((n, c), MODE_COMPUTE, dtype=np.int8)


def depthwise_path(geom: ConvGeometry) -> str:
    """Which depthwise kernel serves ``geom``: 3x3, dilation 1, stride 1 or 2 both ways: ``flat3x3`` where
    flat_3x3_fits, else ``taps3x3`` (measured 0.5-0.9x the time of the other two at MobileNetV2's shapes, 7x7
    to 112x112); others ``blocks`` (channels-last, small output planes) or ``planes``."""
    g = geom
    if (g.kh, g.kw, g.dil_h, g.dil_w) == (3, 3, 1, 1) and g.stride_h == g.stride_w and g.stride_h in (1, 2):
        return "flat3x3" if flat_3x3_fits(g) else "taps3x3"
    return "blocks" if g.pixels <= SMALL_PLANE else "planes"


def flat_3x3_fits(geom: ConvGeometry) -> bool:
    """Whether _depthwise_3x3_flat_kernel serves a 3x3, dilation-1 depthwise ``geom``: padding 1 above and to
    the left and either stride 1 with the output the input's size, or stride 2 on an even width W with W / 2
    outputs per row (right padding 0 or 1), fewer than FUSED_DEPTHWISE_MIN_WIDTH (wider ones keep the taps3x3
    kernel's fused rows: at 112 -> 56 the flat kernel took 447 us against 357, at 56 -> 28 125 against 172;
    one-off, hot, 1 thread)."""
    g = geom
    if (g.top, g.left) != (1, 1):
        return False
    if g.stride_h == 1:
        return (g.ho, g.wo) == (g.h, g.w)
    return g.w % 2 == 0 and g.wo == g.w // 2 and g.wo < FUSED_DEPTHWISE_MIN_WIDTH


def depthwise(x: np.ndarray, filters: np.ndarray, bias: np.ndarray | None, act: Activation | None,
              modes: np.ndarray | None, geom: ConvGeometry, out: np.ndarray,
              context: KernelContext | None = None, channels: np.ndarray | None = None) -> None:
    """As numpy_backend.conv.depthwise: x: float32 (N, C, H, W) -> out: float32 (N, C, Ho, Wo)."""
    g = geom
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    bias = zeros(filters.shape[0]) if bias is None else bias
    code, alpha, beta, lo, hi = activation_params(act)
    threads = _threads(context)
    path = depthwise_path(g)
    if path == "flat3x3":  # reads the filters of ``channels`` in place
        channels = all_indices(g.c) if channels is None else np.ascontiguousarray(channels, dtype=np.int64)
        modes = _all_compute(n, g.c) if modes is None else modes
        # Work as for taps3x3 below: elements written. A serial call is one run of every plane, straight to the planes
        # loop: each run zeroes its own plane buffer (16 runs: 177 against 152 us for 32 x 112x112, one-off).
        if not parallel.wants_parallel(threads, out.size):
            _depthwise_3x3_flat_planes(x, filters, bias, channels, modes, g.stride_h, 1, code, alpha, beta, lo, hi,
                                       out)
            return
        _depthwise_3x3_flat_kernel(threads, out.size, x, filters, bias, channels, modes, g.stride_h,
                                   chunk_count(n * g.c), code, alpha, beta, lo, hi, out)
        return
    if channels is not None:
        filters, bias = filters[channels], bias[channels]
    if path == "blocks":
        filters_t = np.ascontiguousarray(filters.reshape(g.c, -1).T)
        for i in range(n):
            if modes is None:
                compute = all_indices(g.c)
            else:
                compute = np.flatnonzero(modes[i] == MODE_COMPUTE).astype(np.int64)
                out[i, modes[i] == MODE_ZERO] = 0.0
                constant = np.flatnonzero(modes[i] == MODE_BIAS)
                if constant.size:
                    values = bias[constant].copy()
                    apply_activation(values, act)
                    out[i, constant] = values[:, None, None]
            _depthwise_blocks_kernel(threads, compute.size * g.pixels * g.kh * g.kw, x[i], filters_t, bias, compute,
                                     g.stride_h, g.stride_w, g.dil_h, g.dil_w, g.top, g.left, g.kh, g.kw, code,
                                     alpha, beta, lo, hi, out[i])
        return
    if modes is None:
        modes = _all_compute(n, g.c)  # the kernels below only read it
    sh, sw = g.stride_h, g.stride_w
    if path == "taps3x3":
        # Phase planes hold every padded row/column an input lands in and every one an output's taps read
        # (row oh + i // s, column ow + j // s), + 1 row of slack: the pass runs over whole rows of pitch.
        pitch = max(-(-(g.left + g.w) // sw), g.wo + 2 // sw)
        phase_rows = max(-(-(g.top + g.h) // sh), g.ho + 2 // sh) + 1
        # Work = elements touched (written), as for the other kernels, not x9 taps: this pass is memory-bound
        # (384x14x14 in ~80 us), and split over 2 threads MobileNetV2 224's depthwise convs lost more in their
        # reader (the next 1x1 GEMM, on this core, reading planes written on the other) than they gained.
        _depthwise_3x3_kernel(threads, out.size, x, filters, bias, modes, sh, g.top, g.left, phase_rows, pitch,
                              chunk_count(n * g.c), FUSED_DEPTHWISE_MIN_WIDTH, code, alpha, beta, lo, hi, out)
        return
    # Phase planes hold every padded row/column an input lands in and every one a tap reads, + 1 row of
    # slack: the accumulator loop runs past the last output row's last column.
    pitch = max(g.left + g.w, (g.wo - 1) * sw + (g.kw - 1) * g.dil_w + 1)
    phase_rows = max(-(-(g.top + g.h) // sh), g.ho + (g.kh - 1) * g.dil_h // sh) + 1
    _depthwise_planes_kernel(threads, out.size * g.kh * g.kw, x, filters, bias, modes, sh, sw, g.dil_h, g.dil_w, g.top,
                             g.left, phase_rows, pitch, code, alpha, beta, lo, hi, out)


NUMBA_MICROKERNELS = ConvMicrokernels(im2col=im2col, depthwise=depthwise, bias_activation=bias_activation,
                                      bias_activation_block=bias_activation_block,
                                      scatter_bias_activation=scatter_bias_activation,
                                      gather_weights=gather_weights, winograd_input=winograd.input_transform,
                                      winograd_output=winograd.output_transform,
                                      winograd_gather=winograd.gather_transformed, gather_rows=gather_rows,
                                      packed_gemm=PackedGemm(pays=packed_gemm.pays,
                                                             gathered_pays=packed_gemm.gathered_pays,
                                                             pack=packed_gemm.pack,
                                                             pack_gathered=packed_gemm.pack_gathered,
                                                             packed_size=packed_gemm.packed_size,
                                                             run=packed_gemm.packed_gemm,
                                                             unpack=packed_gemm.unpack,
                                                             pack_slices=packed_gemm.pack_slices,
                                                             unpack_slices=packed_gemm.unpack_slices,
                                                             run_slices=packed_gemm.packed_gemm_slices,
                                                             channel_steps=packed_gemm.channel_steps)
                                      if packed_gemm.available() else None,
                                      row_gemm=row_gemm.row_gemm if row_gemm.ENABLED else None,
                                      row_gemm_pays=row_gemm.pays if row_gemm.ENABLED else None,
                                      row_gemm_wide=row_gemm.wide if row_gemm.ENABLED else None,
                                      split_matmul=blas_split.split_matmul if blas_split.available() else None,
                                      split_min_macs=lambda: parallel.MIN_PARALLEL_MACS,
                                      blocked_conv=blocked_conv,
                                      zero_other_rows=zero_other_rows)


def make_conv(spec: KernelSpec) -> ConvKernel:
    """Factory: pack the weights of a Conv for the numba backend."""
    return ConvKernel(spec, NUMBA_MICROKERNELS)


FACTORIES = {"Conv": make_conv}

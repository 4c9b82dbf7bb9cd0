"""Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms in Numba (see :mod:`parsicore.kernels.numpy_backend.winograd`
for the method and layouts). The 16 or 36 GEMMs between them are one batched ``np.matmul`` (BLAS per slice).

Input transform: per input channel, the padded plane is split into its (row, column) phases modulo the
tile size m (4 phases for F(2x2), 16 for F(4x4)) once; then the rows of every tile are combined (B^T d) and
each tile's columns (d B), in loops over all tiles that are unit-stride and vectorise. Output transform: per
output channel, the product planes (contiguous over tiles) are combined (A^T m A) into m*m output phase
planes, which go through the fused epilogue (bias + activation) and are interleaved into the output rows.
Each tile size has its own pair of kernels (``_input_kernel``/``_output_kernel`` for F(2x2), ``..._kernel4`` for
F(4x4)): one pair serving both, with branches on the size, made F(2x2)'s transforms 1.2-1.6x slower.

All of them index their flat arrays with unsigned integers and make no array view in their inner loops: in Numba
a view costs a reference-count update, and a signed computed index the negative-index wrap-around check,
which also stops LLVM from vectorising (measured 0.41-0.82x the time of the view-per-pass versions at
ResNet-18's shapes).
"""

from __future__ import annotations

import numba
import numpy as np

from parsicore.kernels.base import Activation, KernelContext
from parsicore.kernels.numba_backend.epilogue import activation_params, all_indices, finish_row, zeros
from parsicore.kernels.numba_backend.gather import gather_rows
from parsicore.kernels.numba_backend.parallel import chunk_bounds, chunk_count, jit_inline, serial_and_parallel
from parsicore.kernels.numpy_backend.winograd import variant


@jit_inline
def _b_transpose(src, s0, s1, s2, s3, dst, d0, d1, d2, d3, length):
    """B^T applied to four planes of ``length`` floats at offsets s0..s3 of src (unsigned), written at d0..d3
    of dst: (v0 - v2, v1 + v2, v2 - v1, v1 - v3). Rows of a tile (B^T d), then its columns ((.) B)."""
    for q in range(length):
        v0 = src[s0 + q]
        v1 = src[s1 + q]
        v2 = src[s2 + q]
        v3 = src[s3 + q]
        dst[d0 + q] = v0 - v2
        dst[d1 + q] = v1 + v2
        dst[d2 + q] = v2 - v1
        dst[d3 + q] = v1 - v3


@jit_inline
def _a_transpose(src, s0, s1, s2, s3, dst, d0, d1, length):
    """A^T applied to four planes of ``length`` floats at offsets s0..s3 of src (unsigned), written at d0, d1
    of dst: (v0 + v1 + v2, v1 - v2 - v3). A tile's output rows (A^T m), then its output columns ((.) A)."""
    for q in range(length):
        v1 = src[s1 + q]
        v2 = src[s2 + q]
        dst[d0 + q] = src[s0 + q] + v1 + v2
        dst[d1 + q] = v1 - v2 - src[s3 + q]


@serial_and_parallel
def _input_kernel(x, channels, top, left, tiles_h, pitch, chunks, out):
    """x: float32 (C, H, W); channels: int64 (S,) -> out: float32 (16, S, tiles_h*pitch).

    Per channel the zero-padded plane is split into its four (row parity, column parity) phases, each
    (tiles_h + 1) x pitch. Tile (ty, tx) sits at q = ty*pitch + tx and reads padded (2ty + i, 2tx + j) =
    phase (i % 2, j % 2) at q + (i // 2)*pitch + j // 2, so each of the 16 transformed values is a
    sum/difference of whole shifted phase planes: long unit-stride loops that vectorise (first B^T d into
    16 planes, then (.) B into the output). Column ``tiles_w`` of each tile row (q = ty*pitch + tiles_w) is
    padding whose values are never used. The planes are allocated once per chunk of channels (their zero
    padding is never written, so it stays zero), and indices are unsigned (see the module docstring).
    """
    _, h, w = x.shape
    n_sel = channels.shape[0]
    u = np.uint64
    p = u(pitch)
    phase_rows = tiles_h + 1
    plane = u(phase_rows) * p
    length = u(tiles_h) * p
    xf = x.reshape(-1)
    of = out.reshape(-1)
    stride_xi = u(n_sel) * length
    for chunk in numba.prange(chunks):
        # phase (row parity r, column parity c) at (2r + c) * plane; + 1: the last tile row's padding
        # column reads one element past the last plane
        phases = np.zeros(int(u(4) * plane + u(1)), dtype=np.float32)
        e = np.empty(int(u(16) * length), dtype=np.float32)
        first_channel, stop = chunk_bounds(chunk, chunks, n_sel)
        for s in range(first_channel, stop):
            source = u(channels[s]) * u(h) * u(w)
            for ih in range(h):
                row = ih + top
                if row >= 2 * phase_rows:
                    break
                src_row = source + u(ih) * u(w)
                for parity in range(2):
                    first = (parity - left) % 2
                    count = min((w - first + 1) // 2, pitch - (first + left) // 2)
                    dst = u((row % 2) * 2 + parity) * plane + u(row // 2) * p + u((first + left) // 2)
                    src = src_row + u(first)
                    for t in range(max(count, 0)):
                        phases[dst + u(t)] = xf[src + u(2) * u(t)]
            # e[a, j] = (B^T d)[a] for tile column offset j: rows combined, whole planes
            for j in range(4):
                col = u(j // 2)
                d0 = u(j % 2) * plane + col               # padded row 2ty + 0: phase (0, j % 2)
                d1 = u(2 + j % 2) * plane + col           # row 2ty + 1: phase (1, j % 2)
                d2 = d0 + p                               # row 2ty + 2
                d3 = d1 + p                               # row 2ty + 3
                e0 = u(j) * length
                e1 = u(4 + j) * length
                e2 = u(8 + j) * length
                e3 = u(12 + j) * length
                _b_transpose(phases, d0, d1, d2, d3, e, e0, e1, e2, e3, length)
            base = u(s) * length
            for a in range(4):
                f0 = u(4 * a) * length
                f1 = f0 + length
                f2 = f1 + length
                f3 = f2 + length
                o0 = u(4 * a) * stride_xi + base
                o1 = o0 + stride_xi
                o2 = o1 + stride_xi
                o3 = o2 + stride_xi
                _b_transpose(e, f0, f1, f2, f3, of, o0, o1, o2, o3, length)


@jit_inline
def _product_row(rows, k, yf, y0, plane_out):
    """The row of the products that output channel k was computed in (rows: int64, sorted), or -1 after
    zeroing its output plane (plane_out floats at unsigned offset y0 of yf) when k is not among them."""
    r = np.searchsorted(rows, k)
    if r >= rows.shape[0] or rows[r] != k:
        for t in range(plane_out):
            yf[y0 + t] = 0.0
        return -1
    return r


@serial_and_parallel
def _output_kernel(m, rows, bias, has_bias, tiles_h, tiles_w, pitch, chunks, code, alpha, beta, lo, hi, y):
    """m: float32 (16, R, tiles_h*pitch); rows: int64 (R,) sorted, the output channel of each m row -> y:
    float32 (K, Ho, Wo): y[rows[r]] = act(A^T m A + bias) cropped; every other channel 0.

    The four output phases (tile row i, tile column j) are computed as whole planes and finished (bias,
    activation) there, in long loops; each output row then interleaves its two column phases. Scratch
    planes are allocated once per chunk of output channels; indices are unsigned.
    """
    k_count, ho, wo = y.shape
    n_rows = rows.shape[0]
    u = np.uint64
    length = u(tiles_h) * u(pitch)
    mf = m.reshape(-1)
    yf = y.reshape(-1)
    stride_xi = u(n_rows) * length
    pairs = wo // 2
    plane_out = u(ho) * u(wo)
    for chunk in numba.prange(chunks):
        sums = np.empty(int(u(8) * length), dtype=np.float32)
        phase = np.empty(int(u(4) * length), dtype=np.float32)
        first_row, stop = chunk_bounds(chunk, chunks, k_count)
        for k in range(first_row, stop):
            y0 = u(k) * plane_out
            r = _product_row(rows, k, yf, y0, plane_out)
            if r < 0:
                continue
            b = bias[k] if has_bias else np.float32(0.0)
            base = u(r) * length
            for col in range(4):  # A^T m: the tile's two output rows, per tile column
                m0 = u(col) * stride_xi + base
                m1 = m0 + u(4) * stride_xi
                m2 = m1 + u(4) * stride_xi
                m3 = m2 + u(4) * stride_xi
                s0 = u(col) * length
                s1 = u(4 + col) * length
                _a_transpose(mf, m0, m1, m2, m3, sums, s0, s1, length)
            for i in range(2):  # (.) A: the tile's two output columns
                a0 = u(4 * i) * length
                a1 = a0 + length
                a2 = a1 + length
                a3 = a2 + length
                p0 = u(2 * i) * length
                p1 = p0 + length
                _a_transpose(sums, a0, a1, a2, a3, phase, p0, p1, length)
            # The four phase planes are the whole of ``phase``: one epilogue pass, no plane views (a view costs
            # a reference-count update, see the module docstring).
            finish_row(phase, phase, b, code, alpha, beta, lo, hi)
            for oh in range(ho):
                start = u(oh % 2) * u(2) * length + u(oh // 2) * u(pitch)
                right = start + length
                d = y0 + u(oh) * u(wo)
                for tx in range(pairs):
                    yf[d + u(2) * u(tx)] = phase[start + u(tx)]
                    yf[d + u(2) * u(tx) + u(1)] = phase[right + u(tx)]
                if wo % 2:
                    yf[d + u(wo - 1)] = phase[start + u(tiles_w - 1)]


@jit_inline
def _split_phases4(xf, source, h, w, top, left, phase_rows, pitch, plane, phases):
    """F(4x4): one input plane (h x w floats at unsigned offset ``source`` of xf) into the 16 (row % 4,
    column % 4) phases of its zero-padded version (padded row/col 0 = input row -top / col -left): phase (r, c)
    starts at (4r + c) * plane, its row i is padded row 4i + r (phase_rows rows of ``pitch``). Only interior
    positions are written, so the padding a caller zeroed once stays zero. Each input row's whole groups of
    four columns go in one loop that writes all four column phases (an interleaved access LLVM vectorises); the
    few columns before and after, one by one. One strided loop per phase took 155 against 78 us at 64 channels
    of 56x56 (a one-off check, 1 thread). F(2x2)'s kernel keeps its per-phase loops: one kernel serving both
    tile sizes made F(2x2)'s transforms 1.2-1.6x slower at 14x14 and 28x28 (ResNet-18's layer 3, the small
    CNNs; scripts/ab_checkouts.py against 7e8f78f: small CNN 1.06x, VGG-style 1.03x), a one-off check."""
    m = 4
    u = np.uint64
    p = u(pitch)
    head = (-left) % m  # input columns before the first one that lands on column phase 0
    col0 = (head + left) // m
    full = max(0, min((w - head) // m, pitch - col0))  # whole groups of m columns inside the phases
    tail = head + full * m
    for ih in range(h):
        row = ih + top
        if row >= m * phase_rows:
            break
        src_row = source + u(ih) * u(w)
        row_base = u((row % m) * m) * plane + u(row // m) * p  # phase (row % m, 0), this row
        for iw in range(min(head, w)):
            col = iw + left
            if col // m < pitch:
                phases[row_base + u(col % m) * plane + u(col // m)] = xf[src_row + u(iw)]
        d = row_base + u(col0)
        s = src_row + u(head)
        for t in range(u(full)):
            phases[d + t] = xf[s + u(4) * t]
            phases[d + plane + t] = xf[s + u(4) * t + u(1)]
            phases[d + u(2) * plane + t] = xf[s + u(4) * t + u(2)]
            phases[d + u(3) * plane + t] = xf[s + u(4) * t + u(3)]
        for iw in range(tail, w):
            col = iw + left
            if col // m < pitch:
                phases[row_base + u(col % m) * plane + u(col // m)] = xf[src_row + u(iw)]


@jit_inline
def _b_transpose6(src, s0, s1, s2, s3, s4, s5, dst, d0, d1, d2, d3, d4, d5, length):
    """F(4x4)'s B^T applied to six planes of ``length`` floats at offsets s0..s5 of src (unsigned), written at
    d0..d5 of dst: rows (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1). One loop per output plane: a loop storing to one plane needs
    few enough run-time alias checks against its loads for LLVM to vectorise it (one loop storing all six:
    the input transform's B^T passes took 213 against 150 us at 64 channels of 56x56, a one-off check; the
    same split of F(2x2)'s four-term loops and of the A^T loops gained nothing measurable, so they stay whole)."""
    four = np.float32(4.0)
    five = np.float32(5.0)
    two = np.float32(2.0)
    for q in range(length):
        dst[d0 + q] = four * src[s0 + q] - five * src[s2 + q] + src[s4 + q]
    for q in range(length):
        dst[d1 + q] = src[s4 + q] + src[s3 + q] - four * (src[s1 + q] + src[s2 + q])
    for q in range(length):
        dst[d2 + q] = src[s4 + q] - src[s3 + q] + four * (src[s1 + q] - src[s2 + q])
    for q in range(length):
        dst[d3 + q] = src[s4 + q] - src[s2 + q] + two * (src[s3 + q] - src[s1 + q])
    for q in range(length):
        dst[d4 + q] = src[s4 + q] - src[s2 + q] - two * (src[s3 + q] - src[s1 + q])
    for q in range(length):
        dst[d5 + q] = four * src[s1 + q] - five * src[s3 + q] + src[s5 + q]


@jit_inline
def _a_transpose6(src, s0, s1, s2, s3, s4, s5, dst, d0, d1, d2, d3, length):
    """F(4x4)'s A^T applied to six planes at offsets s0..s5 of src (unsigned), written at d0..d3 of dst: rows
    (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)."""
    for q in range(length):
        v1 = src[s1 + q]
        v2 = src[s2 + q]
        v3 = src[s3 + q]
        v4 = src[s4 + q]
        plus = v1 + v2
        minus = v1 - v2
        plus2 = v3 + v4
        minus2 = v3 - v4
        dst[d0 + q] = src[s0 + q] + plus + plus2
        dst[d1 + q] = minus + np.float32(2.0) * minus2
        dst[d2 + q] = plus + np.float32(4.0) * plus2
        dst[d3 + q] = minus + np.float32(8.0) * minus2 + src[s5 + q]


@jit_inline
def _transform_input4(phases, plane, p, length, e, of, base, stride_xi):
    """F(4x4): one channel's 16 phases -> its 36 transformed planes. Tile (ty, tx) at q reads padded
    (4ty + i, 4tx + j) = phase (i % 4, j % 4) at q + (i // 4)*p + j // 4."""
    u = np.uint64
    for j in range(6):  # e[a, j] = (B^T d)[a]: rows i = 0..5 combined, whole planes
        d0 = u(j % 4) * plane + u(j // 4)        # padded row 4ty + i: phase (i % 4, j % 4), + (i // 4) rows
        d1 = d0 + u(4) * plane
        d2 = d1 + u(4) * plane
        d3 = d2 + u(4) * plane
        _b_transpose6(phases, d0, d1, d2, d3, d0 + p, d1 + p, e, u(j) * length, u(6 + j) * length,
                      u(12 + j) * length, u(18 + j) * length, u(24 + j) * length, u(30 + j) * length, length)
    for a in range(6):  # (.) B
        f0 = u(6 * a) * length
        o0 = u(6 * a) * stride_xi + base
        _b_transpose6(e, f0, f0 + length, f0 + u(2) * length, f0 + u(3) * length, f0 + u(4) * length,
                      f0 + u(5) * length, of, o0, o0 + stride_xi, o0 + u(2) * stride_xi, o0 + u(3) * stride_xi,
                      o0 + u(4) * stride_xi, o0 + u(5) * stride_xi, length)


@jit_inline
def _transform_output4(mf, base, stride_xi, length, sums, phase):
    """F(4x4): 36 product planes -> 16 output phase planes (tile row i, column j at phase[(4i + j)*length])."""
    u = np.uint64
    for col in range(6):  # A^T m: the tile's four output rows, per tile column; sums[i, col] at 6i + col
        m0 = u(col) * stride_xi + base
        step = u(6) * stride_xi
        _a_transpose6(mf, m0, m0 + step, m0 + u(2) * step, m0 + u(3) * step, m0 + u(4) * step, m0 + u(5) * step,
                      sums, u(col) * length, u(6 + col) * length, u(12 + col) * length, u(18 + col) * length,
                      length)
    for i in range(4):  # (.) A: the tile's four output columns
        a0 = u(6 * i) * length
        p0 = u(4 * i) * length
        _a_transpose6(sums, a0, a0 + length, a0 + u(2) * length, a0 + u(3) * length, a0 + u(4) * length,
                      a0 + u(5) * length, phase, p0, p0 + length, p0 + u(2) * length, p0 + u(3) * length, length)


@serial_and_parallel
def _input_kernel4(x, channels, top, left, tiles_h, pitch, chunks, out):
    """F(4x4): x: float32 (C, H, W); channels: int64 (S,) -> out: float32 (36, S, tiles_h*pitch).

    As _input_kernel with phases modulo 4: the padded plane's 16 (row % 4, column % 4) phases, each
    (tiles_h + 1) x pitch; tile (ty, tx) at q = ty*pitch + tx reads padded (4ty + i, 4tx + j) = phase
    (i % 4, j % 4) at q + (i // 4)*pitch + j // 4. B^T d into 36 planes, then (.) B into the output.
    """
    _, h, w = x.shape
    u = np.uint64
    plane = u(tiles_h + 1) * u(pitch)
    length = u(tiles_h) * u(pitch)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    stride_xi = u(channels.shape[0]) * length
    for chunk in numba.prange(chunks):
        phases = np.zeros(int(u(16) * plane + u(1)), dtype=np.float32)  # + 1: see _input_kernel
        e = np.empty(int(u(36) * length), dtype=np.float32)
        first_channel, stop = chunk_bounds(chunk, chunks, channels.shape[0])
        for s in range(first_channel, stop):
            _split_phases4(xf, u(channels[s]) * u(h) * u(w), h, w, top, left, tiles_h + 1, pitch, plane, phases)
            _transform_input4(phases, plane, u(pitch), length, e, of, u(s) * length, stride_xi)


@serial_and_parallel
def _output_kernel4(m, rows, bias, has_bias, tiles_h, tiles_w, pitch, chunks, code, alpha, beta, lo, hi, y):
    """F(4x4): m: float32 (36, R, tiles_h*pitch); rows: int64 (R,) sorted -> y: float32 (K, Ho, Wo), as
    _output_kernel: A^T m into 24 planes, (.) A into the 16 output phase planes (tile row i, column j at
    4i + j), the fused epilogue on all of them at once, then each output row gathered from its four phases."""
    k_count, ho, wo = y.shape
    u = np.uint64
    length = u(tiles_h) * u(pitch)
    mf = m.reshape(-1)
    yf = y.reshape(-1)
    stride_xi = u(rows.shape[0]) * length
    plane_out = u(ho) * u(wo)
    for chunk in numba.prange(chunks):
        sums = np.empty(int(u(24) * length), dtype=np.float32)
        phase = np.empty(int(u(16) * length), dtype=np.float32)
        first_row, stop = chunk_bounds(chunk, chunks, k_count)
        for k in range(first_row, stop):
            y0 = u(k) * plane_out
            r = _product_row(rows, k, yf, y0, plane_out)
            if r < 0:
                continue
            _transform_output4(mf, u(r) * length, stride_xi, length, sums, phase)
            finish_row(phase, phase, bias[k] if has_bias else np.float32(0.0), code, alpha, beta, lo, hi)
            for oh in range(ho):
                start = u(oh % 4) * u(4) * length + u(oh // 4) * u(pitch)
                d = y0 + u(oh) * u(wo)
                for ow in range(wo):
                    yf[d + u(ow)] = phase[start + u(ow % 4) * length + u(ow // 4)]


@serial_and_parallel
def _gather_kernel(u, rows, channels, out):
    """u: float32 (X, K, C); rows: int64 (R,); channels: int64 (S,) -> out: float32 (X, R, S)."""
    n_rows = rows.shape[0]
    n_sel = channels.shape[0]
    for task in numba.prange(u.shape[0] * n_rows):
        xi = task // n_rows
        r = task % n_rows
        src = u[xi, rows[r]]
        dst = out[xi, r]
        for s in range(n_sel):
            dst[s] = src[channels[s]]


def _threads(context: KernelContext | None) -> int | None:
    return None if context is None else context.threads


def _work(elements: int, parallel: bool | None) -> int:
    """The work figure a kernel pair is called with: ``elements``, or forced past (or under) its threshold
    when the caller decided for the whole conv (``parallel`` True / False)."""
    return elements if parallel is None else (1 << 62 if parallel else 0)


def input_transform(x: np.ndarray, channels: np.ndarray | None, top: int, left: int, tiles_h: int, tiles_w: int,
                    out: np.ndarray, context: KernelContext | None = None, parallel: bool | None = None) -> None:
    """As numpy_backend.winograd.input_transform; ``parallel``: the caller's choice of build (None: by size)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if channels is None:
        channels = all_indices(x.shape[0])
    kernel = _input_kernel4 if variant(out.shape[0]) == 4 else _input_kernel
    kernel(_threads(context), _work(out.size, parallel), x, channels, top, left, tiles_h, tiles_w + 1,
           chunk_count(channels.shape[0]), out)


def output_transform(m: np.ndarray, rows: np.ndarray | None, bias: np.ndarray | None, act: Activation | None,
                     tiles_h: int, tiles_w: int, y: np.ndarray, context: KernelContext | None = None,
                     parallel: bool | None = None) -> None:
    """As numpy_backend.winograd.output_transform; ``parallel`` as in input_transform."""
    code, alpha, beta, lo, hi = activation_params(act)
    k = y.shape[0]
    if rows is None:
        rows = all_indices(k)
    has_bias = bias is not None
    bias = bias if has_bias else zeros(k)
    kernel = _output_kernel4 if variant(m.shape[0]) == 4 else _output_kernel
    kernel(_threads(context), _work(y.size, parallel), m, rows, bias, has_bias, tiles_h, tiles_w, tiles_w + 1,
           chunk_count(k), code, alpha, beta, lo, hi, y)


def gather_transformed(u: np.ndarray, rows: np.ndarray | None, channels: np.ndarray | None, out: np.ndarray,
                       context: KernelContext | None = None) -> None:
    """As numpy_backend.winograd.gather_transformed."""
    _, k, c = u.shape
    if channels is None and rows is not None:
        # Whole rows: one block copy each (measured 0.5-0.7x the element loop at 128-256 channels).
        gather_rows(u, rows, out, context)
        return
    rows = all_indices(k) if rows is None else rows
    channels = all_indices(c) if channels is None else channels
    _gather_kernel(_threads(context), out.size, u, rows, channels, out)

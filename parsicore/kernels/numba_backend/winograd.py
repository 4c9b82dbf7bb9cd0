"""Winograd F(2x2, 3x3) transforms in Numba (see :mod:`parsicore.kernels.numpy_backend.winograd` for the
method and layouts). The 16 GEMMs between them are one batched ``np.matmul`` (BLAS per slice).

Input transform: per input channel, the padded plane is split into its four row/column parity phases
once; then the four rows of every tile are combined (B^T d) and each tile's columns (d B), in loops over
all tiles that are unit-stride and vectorise. Output transform: per output channel, the product planes
(contiguous over tiles) are combined (A^T m A) into four output phase planes, which go through the fused
epilogue (bias + activation) and are interleaved into the output rows.

Both index their flat arrays with unsigned integers and make no array view in their inner loops: in Numba
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
            r = np.searchsorted(rows, k)
            y0 = u(k) * plane_out
            if r >= n_rows or rows[r] != k:
                for t in range(plane_out):
                    yf[y0 + t] = 0.0
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


@serial_and_parallel
def _gather_kernel(u, rows, channels, out):
    """u: float32 (16, K, C); rows: int64 (R,); channels: int64 (S,) -> out: float32 (16, R, S)."""
    n_rows = rows.shape[0]
    n_sel = channels.shape[0]
    for task in numba.prange(16 * n_rows):
        xi = task // n_rows
        r = task % n_rows
        src = u[xi, rows[r]]
        dst = out[xi, r]
        for s in range(n_sel):
            dst[s] = src[channels[s]]


def _threads(context: KernelContext | None) -> int | None:
    return None if context is None else context.threads


def input_transform(x: np.ndarray, channels: np.ndarray | None, top: int, left: int, tiles_h: int, tiles_w: int,
                    out: np.ndarray, context: KernelContext | None = None) -> None:
    """As numpy_backend.winograd.input_transform."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if channels is None:
        channels = all_indices(x.shape[0])
    _input_kernel(_threads(context), out.size, x, channels, top, left, tiles_h, tiles_w + 1,
                  chunk_count(channels.shape[0]), out)


def output_transform(m: np.ndarray, rows: np.ndarray | None, bias: np.ndarray | None, act: Activation | None,
                     tiles_h: int, tiles_w: int, y: np.ndarray, context: KernelContext | None = None) -> None:
    """As numpy_backend.winograd.output_transform."""
    code, alpha, beta, lo, hi = activation_params(act)
    k = y.shape[0]
    if rows is None:
        rows = all_indices(k)
    has_bias = bias is not None
    bias = bias if has_bias else zeros(k)
    _output_kernel(_threads(context), y.size, m, rows, bias, has_bias, tiles_h, tiles_w, tiles_w + 1,
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

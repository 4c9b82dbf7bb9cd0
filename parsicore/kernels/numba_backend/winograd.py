"""Winograd F(2x2, 3x3) transforms in Numba (see :mod:`parsicore.kernels.numpy_backend.winograd` for the
method and layouts). The 16 GEMMs between them are one batched ``np.matmul`` (BLAS per slice).

Input transform: per input channel, the padded plane is split into even and odd columns once; then per
tile row the four rows are combined (B^T d) and each tile's columns (d B), in loops over tiles that are
unit-stride and vectorise. Output transform: per output channel and output row, the product rows
(contiguous over tiles) are combined (A^T m), the tiles' two columns interleaved, and the row goes
through the fused epilogue (bias + activation) into the output.
"""

from __future__ import annotations

import numba
import numpy as np

from parsicore.kernels.base import Activation, KernelContext
from parsicore.kernels.numba_backend.epilogue import activation_params, all_indices, finish_row, zeros
from parsicore.kernels.numba_backend.parallel import jit, serial_and_parallel


@jit
def _combine(out, a, b, sign_b):
    """out[t] = a[t] + sign_b * b[t] (sign_b is +1 or -1)."""
    if sign_b > 0:
        for t in range(out.shape[0]):
            out[t] = a[t] + b[t]
    else:
        for t in range(out.shape[0]):
            out[t] = a[t] - b[t]


@serial_and_parallel
def _input_kernel(x, channels, top, left, tiles_h, pitch, out):
    """x: float32 (C, H, W); channels: int64 (S,) -> out: float32 (16, S, tiles_h*pitch).

    Per channel the zero-padded plane is split into its four (row parity, column parity) phases, each
    (tiles_h + 1) x pitch. Tile (ty, tx) sits at q = ty*pitch + tx and reads padded (2ty + i, 2tx + j) =
    phase (i % 2, j % 2) at q + (i // 2)*pitch + j // 2, so each of the 16 transformed values is a
    sum/difference of whole shifted phase planes: long unit-stride loops that vectorise. Column
    ``tiles_w`` of each tile row (q = ty*pitch + tiles_w) is padding whose values are never used.
    """
    _, h, w = x.shape
    n_sel = channels.shape[0]
    phase_rows = tiles_h + 1
    plane = phase_rows * pitch
    length = tiles_h * pitch
    for s in numba.prange(n_sel):
        src_plane = x[channels[s]]
        # + 1: the last tile row's padding column (q = length - 1) reads one element past a phase plane
        phases = np.zeros((2, 2, plane + 1), dtype=np.float32)
        for ih in range(h):
            row = ih + top
            if row >= 2 * phase_rows:
                break
            for parity in range(2):
                first = (parity - left) % 2  # first input column landing on this column parity
                start = (row // 2) * pitch + (first + left) // 2
                count = min((w - first + 1) // 2, pitch - (first + left) // 2)
                dst = phases[row % 2, parity, start:start + max(count, 0)]
                src = src_plane[ih]
                for t in range(dst.shape[0]):
                    dst[t] = src[first + 2 * t]
        # e[a, j]: B^T d for tile column offset j (rows combined), as whole planes.
        e = np.empty((4, 4, length), dtype=np.float32)
        for j in range(4):
            col = j // 2
            d0 = phases[0, j % 2, col:col + length]
            d1 = phases[1, j % 2, col:col + length]
            d2 = phases[0, j % 2, pitch + col:pitch + col + length]
            d3 = phases[1, j % 2, pitch + col:pitch + col + length]
            _combine(e[0, j], d0, d2, -1)
            _combine(e[1, j], d1, d2, 1)
            _combine(e[2, j], d2, d1, -1)
            _combine(e[3, j], d1, d3, -1)
        for a in range(4):  # (.) B: columns combined
            _combine(out[4 * a, s], e[a, 0], e[a, 2], -1)
            _combine(out[4 * a + 1, s], e[a, 1], e[a, 2], 1)
            _combine(out[4 * a + 2, s], e[a, 2], e[a, 1], -1)
            _combine(out[4 * a + 3, s], e[a, 1], e[a, 3], -1)


@jit
def _sum3(out, a, b, c):
    """out[t] = a[t] + b[t] + c[t]."""
    for t in range(out.shape[0]):
        out[t] = a[t] + b[t] + c[t]


@jit
def _diff3(out, a, b, c):
    """out[t] = a[t] - b[t] - c[t]."""
    for t in range(out.shape[0]):
        out[t] = a[t] - b[t] - c[t]


@serial_and_parallel
def _output_kernel(m, rows, bias, has_bias, tiles_h, tiles_w, pitch, code, alpha, beta, lo, hi, y):
    """m: float32 (16, R, tiles_h*pitch); rows: int64 (R,) sorted, the output channel of each m row -> y:
    float32 (K, Ho, Wo): y[rows[r]] = act(A^T m A + bias) cropped; every other channel 0.

    The four output phases (tile row i, tile column j) are computed as whole planes and finished (bias,
    activation) there, in long loops; each output row then interleaves its two column phases.
    """
    k_count, ho, wo = y.shape
    n_rows = rows.shape[0]
    length = tiles_h * pitch
    pairs = wo // 2
    for k in numba.prange(k_count):
        r = np.searchsorted(rows, k)
        if r >= n_rows or rows[r] != k:
            y[k, :, :] = 0.0
            continue
        b = bias[k] if has_bias else np.float32(0.0)
        sums = np.empty((2, 4, length), dtype=np.float32)
        for col in range(4):  # A^T m: the tile's two output rows, per tile column
            _sum3(sums[0, col], m[col, r], m[4 + col, r], m[8 + col, r])
            _diff3(sums[1, col], m[4 + col, r], m[8 + col, r], m[12 + col, r])
        phase = np.empty((2, 2, length), dtype=np.float32)
        for i in range(2):  # (.) A: the tile's two output columns, then the epilogue
            _sum3(phase[i, 0], sums[i, 0], sums[i, 1], sums[i, 2])
            _diff3(phase[i, 1], sums[i, 1], sums[i, 2], sums[i, 3])
            for j in range(2):
                finish_row(phase[i, j], phase[i, j], b, code, alpha, beta, lo, hi)
        for oh in range(ho):
            start = (oh // 2) * pitch
            left_col = phase[oh % 2, 0, start:start + tiles_w]
            right_col = phase[oh % 2, 1, start:start + tiles_w]
            dst = y[k, oh]
            for tx in range(pairs):
                dst[2 * tx] = left_col[tx]
                dst[2 * tx + 1] = right_col[tx]
            if wo % 2:
                dst[wo - 1] = left_col[tiles_w - 1]


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
    _input_kernel(_threads(context), out.size, x, channels, top, left, tiles_h, tiles_w + 1, out)


def output_transform(m: np.ndarray, rows: np.ndarray | None, bias: np.ndarray | None, act: Activation | None,
                     tiles_h: int, tiles_w: int, y: np.ndarray, context: KernelContext | None = None) -> None:
    """As numpy_backend.winograd.output_transform."""
    code, alpha, beta, lo, hi = activation_params(act)
    k = y.shape[0]
    if rows is None:
        rows = all_indices(k)
    has_bias = bias is not None
    bias = bias if has_bias else zeros(k)
    _output_kernel(_threads(context), y.size, m, rows, bias, has_bias, tiles_h, tiles_w, tiles_w + 1, code, alpha,
                   beta, lo, hi, y)


def gather_transformed(u: np.ndarray, rows: np.ndarray | None, channels: np.ndarray | None, out: np.ndarray,
                       context: KernelContext | None = None) -> None:
    """As numpy_backend.winograd.gather_transformed."""
    _, k, c = u.shape
    rows = all_indices(k) if rows is None else rows
    channels = all_indices(c) if channels is None else channels
    _gather_kernel(_threads(context), out.size, u, rows, channels, out)

"""Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convolutions: alpha^2 GEMMs of (K, C) x (C, tiles),
2.25x (F(2x2): alpha = 4, 16 GEMMs) or 4x (F(4x4): alpha = 6, 36 GEMMs) fewer MACs than direct convolution.

The output is cut into m x m tiles (m = 2 or 4; ``tiles_h`` x ``tiles_w``, the last ones cropped); each reads an
alpha x alpha patch (alpha = m + 2) of the zero-padded input. With the standard matrices (Lavin & Gray, 2016)

    U = G g G^T (weights, once at load),   V = B^T d B (input patches),   Y = A^T (U . V) A (output tiles),

the element-wise product over channels becomes, for each of the alpha^2 positions xi of the transformed tile,
one GEMM ``M[xi] = U[xi] @ V[xi]`` with U[xi]: (K, C), V[xi]: (C, T), T = tiles. F(2x2)'s transforms use only
additions (and the weight transform halves), so its result matches direct convolution to float32 rounding
(relative error ~1e-6 on unit-scale data); F(4x4)'s use the points 0, +-1, +-2 and lose more (~1e-5 of the
output's scale at 64-256 channels): it is taken only where its GEMMs are large (:func:`tile_size`).

Layouts: U: float32 (alpha^2, K, C), xi = alpha*a + b; V: (alpha^2, S, T) for S selected input channels; M:
(alpha^2, R, T) for R selected output rows; the variant is told by the first dimension (16 or 36). T =
tiles_h * (tiles_w + 1): tile (ty, tx) is column ty*(tiles_w + 1) + tx, and the last column of each tile row is
padding (computed, never used) that lets the numba transforms run one long loop over all tiles (see
parsicore.kernels.numba_backend.winograd). Gated convs gather U's rows and columns (active output and input
channels) and transform only active input channels and active output rows.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from parsicore.kernels.base import Activation, KernelContext, apply_activation

#: (B^T, G, A^T) per output tile size m: F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray, 2016), float64.
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 dtype=np.float64)),
}

#: Below these sizes the transforms cost more than the MACs they save, or the GEMMs become too thin for
#: BLAS to run well. MIN_TILES: measured on the development machine (AMD EPYC Zen 3, AVX2, numpy's OpenBLAS,
#: numba, 1 thread, both paths alternated on the same conv): with 16 tiles (7x7, 8x8 outputs) im2col was as
#: fast or faster at every size from 32->64 to 512->512 channels (1.0-1.4x); with 25 tiles it won up to
#: 128->128 and tied above; with 36 tiles and more Winograd won from 64->128 channels (0.70-0.85x). An earlier
#: rule (Zen 4) also took Winograd at 16-35 tiles when K*C <= 128*128: those convs ran 1.06-1.3x slower here.
MIN_CHANNELS = 16
MIN_TILES = 36
#: F(4x4) is taken over F(2x2) with at least MIN_TILES_F4 4x4 tiles and C*K*tiles >= MIN_WORK_F4 (the MACs of
#: one of its 36 GEMMs). Measured (``python scripts/bench_kernels.py --only winograd_f4``, numba, 1 thread, Intel
#: Xeon with AVX-512, whole one-conv models alternated), F(4x4) / F(2x2) time: 0.70 at 64->64 56x56, 0.77 at
#: 128->128 28x28, 0.76-0.81 at 64-128 channels 32x32, 0.86 at 32->32 56x56, 0.88 at 128->128 20x20; at
#: C*K*tiles ~200k 0.95 (64->64 28x28); below it 1.01-1.16; with 16 tiles (14x14) 1.22-1.34 at every size.
MIN_TILES_F4 = 25
MIN_WORK_F4 = 196_000
#: Gated calls use Winograd only with at least this many GEMM columns (tile_columns), else im2col (every conv
#: with MIN_TILES tiles has more; kept as the floor should MIN_TILES be lowered for another CPU).
GATED_MIN_COLUMNS = 36
#: A gated image takes Winograd only when its active output rows R are fewer than this many times its active
#: input channels S, else the gathered im2col GEMM: Winograd transforms every active input channel and output
#: row whatever the other count, so with many rows and few channels its output transform dominates. Measured
#: (numba, 1 thread, the two paths alternated) at 14x14..56x56 outputs, 32..256 channels: R = 4S took im2col
#: 1.0-2.2x faster in 13 of 15 shapes, R = 2S Winograd 0.74-0.92x in 7 of 9; the default model's
#: conv3 (R = 64, S = 4 at 14x14) 56 vs 36 us.
GATED_MAX_ROWS_PER_CHANNEL = 3


def tiles(ho: int, wo: int, m: int = 2) -> tuple[int, int]:
    """(tiles_h, tiles_w): m x m output tiles covering an ho x wo output."""
    return -(-ho // m), -(-wo // m)


def tile_size(c: int, k: int, ho: int, wo: int) -> int:
    """The output tile size m (2 or 4) a Winograd conv of this size takes."""
    th, tw = tiles(ho, wo, 4)
    count = th * tw
    return 4 if count >= MIN_TILES_F4 and c * k * count >= MIN_WORK_F4 else 2


def variant(slices: int) -> int:
    """The output tile size m of a transformed array with ``slices`` = (m + 2)^2 as its first dimension."""
    if slices == 16:
        return 2
    if slices == 36:
        return 4
    raise ValueError(f"a Winograd array has 16 or 36 slices, got {slices}")


def tile_columns(tiles_h: int, tiles_w: int) -> int:
    """T, the GEMM's column count: tiles_h rows of tiles_w tiles plus one padding column each."""
    return tiles_h * (tiles_w + 1)


def gated_pays(n_rows: int, n_cols: int) -> bool:
    """Whether one gated image with n_rows active output rows and n_cols active input channels takes Winograd."""
    return n_rows < GATED_MAX_ROWS_PER_CHANNEL * n_cols


def pays(kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int], groups: int, c: int, k: int,
         ho: int, wo: int) -> bool:
    """Whether a conv of this geometry takes the Winograd path."""
    if (kh, kw, stride, dilation, groups) != (3, 3, (1, 1), (1, 1), 1):
        return False
    if c < MIN_CHANNELS or k < MIN_CHANNELS:
        return False
    th, tw = tiles(ho, wo)
    count = th * tw
    return count >= MIN_TILES


def transform_weights(weight: np.ndarray, m: int = 2) -> np.ndarray:
    """weight: float32 (K, C, 3, 3) -> U: float32 (alpha^2, K, C), U[alpha*a + b] = (G g G^T)[a, b] (computed in
    float64), alpha = m + 2."""
    g = MATRICES[m][1]
    u = np.einsum("ai,kcij,bj->abkc", g, weight.astype(np.float64), g)
    k, c = weight.shape[:2]
    return np.ascontiguousarray(u.reshape(len(g) ** 2, k, c), dtype=np.float32)


def input_transform(x: np.ndarray, channels: np.ndarray | None, top: int, left: int, tiles_h: int, tiles_w: int,
                    out: np.ndarray, context: KernelContext | None = None, parallel: bool | None = None) -> None:
    """One image. x: float32 (C, H, W); channels: int64 (S,) or None -> out: float32 (alpha^2, S, T) = B^T d B of
    every tile's alpha x alpha patch of the zero-padded input (padded row/col 0 is input row -top / col -left);
    the variant (m = 2 or 4) is out's first dimension (16 or 36). ``parallel``: whether a backend with serial and
    parallel builds takes the parallel one (None: its own size rule; ignored here)."""
    m = variant(out.shape[0])
    alpha = m + 2
    if channels is not None:
        x = x[channels]
    s, h, w = x.shape
    rows, cols = m * tiles_h + 2, m * tiles_w + 2
    padded = np.zeros((s, rows, cols), dtype=np.float32)
    # The part of the input the padded window covers (pads may exceed what the tiles read).
    r0, c0 = max(0, -top), max(0, -left)
    r1, c1 = min(h, rows - top), min(w, cols - left)
    if r1 > r0 and c1 > c0:
        padded[:, r0 + top:r1 + top, c0 + left:c1 + left] = x[:, r0:r1, c0:c1]
    grid = out.reshape(alpha, alpha, s, tiles_h, tiles_w + 1)
    grid[..., tiles_w] = 0.0  # the padding column: finite, so the GEMM stays free of NaN from old scratch
    v = grid[..., :tiles_w]
    if m == 4:
        # Two small GEMMs over all patches at once (measured 1.3 ms against 3.7 ms for whole-array adds at 64
        # channels of 56x56, a one-off check).
        st = padded.strides
        d = as_strided(padded, (alpha, alpha, s, tiles_h, tiles_w), (st[1], st[2], st[0], m * st[1], m * st[2]))
        bt32 = MATRICES[4][0].astype(np.float32)
        e = np.tensordot(bt32, d, axes=(1, 0))  # (a, j, s, th, tw): B^T d
        v[...] = np.tensordot(bt32, e, axes=(1, 1)).transpose(1, 0, 2, 3, 4)  # (b, a, ...) -> (a, b, ...)
        return
    # F(2x2): its few additions written out, on strided views (tensordot took 2x their time, a one-off check).
    d = [[padded[:, i:i + 2 * tiles_h:2, j:j + 2 * tiles_w:2] for j in range(4)] for i in range(4)]
    # B^T d: rows; then (B^T d) B: columns.
    e = [[d[0][j] - d[2][j] for j in range(4)], [d[1][j] + d[2][j] for j in range(4)],
         [d[2][j] - d[1][j] for j in range(4)], [d[1][j] - d[3][j] for j in range(4)]]
    for a in range(4):
        ea = e[a]
        np.subtract(ea[0], ea[2], out=v[a, 0])
        np.add(ea[1], ea[2], out=v[a, 1])
        np.subtract(ea[2], ea[1], out=v[a, 2])
        np.subtract(ea[1], ea[3], out=v[a, 3])


def output_transform(m: np.ndarray, rows: np.ndarray | None, bias: np.ndarray | None, act: Activation | None,
                     tiles_h: int, tiles_w: int, y: np.ndarray, context: KernelContext | None = None,
                     parallel: bool | None = None) -> None:
    """m: float32 (alpha^2, R, T), the products for output channels ``rows`` (int64 (R,), sorted; None = all K)
    -> y: float32 (K, Ho, Wo), C-contiguous: y[rows] = act(A^T m A + bias) cropped to (Ho, Wo); other rows 0.
    ``parallel`` as in input_transform."""
    size = variant(m.shape[0])
    alpha = size + 2
    k, ho, wo = y.shape
    r = m.shape[1]
    t = m.reshape(alpha, alpha, r, tiles_h, tiles_w + 1)[..., :tiles_w]
    if size == 4:  # two small GEMMs, as in input_transform
        at32 = MATRICES[4][2].astype(np.float32)
        sums = np.tensordot(at32, t, axes=(1, 0))  # (i, b, r, th, tw): A^T m
        full = np.ascontiguousarray(np.tensordot(at32, sums, axes=(1, 1)).transpose(2, 3, 1, 4, 0))  # (r,th,i,tw,j)
    else:  # F(2x2): its additions written out
        s0 = [t[0, b] + t[1, b] + t[2, b] for b in range(4)]
        s1 = [t[1, b] - t[2, b] - t[3, b] for b in range(4)]
        full = np.empty((r, tiles_h, 2, tiles_w, 2), dtype=np.float32)
        for i, row in enumerate((s0, s1)):
            full[:, :, i, :, 0] = row[0] + row[1] + row[2]
            full[:, :, i, :, 1] = row[1] - row[2] - row[3]
    values = full.reshape(r, size * tiles_h, size * tiles_w)[:, :ho, :wo]
    b = None if bias is None else (bias if rows is None else bias[rows])
    if b is not None:
        values = values + b[:, None, None]
    else:
        values = values.copy()
    apply_activation(values, act)
    if rows is None:
        y[...] = values
    else:
        y.fill(0.0)
        y[rows] = values


def gather_transformed(u: np.ndarray, rows: np.ndarray | None, channels: np.ndarray | None, out: np.ndarray,
                       context: KernelContext | None = None) -> None:
    """u: float32 (X, K, C); rows: int64 (R,) or None; channels: int64 (S,) or None -> out: (X, R, S)."""
    picked = u if rows is None else u[:, rows]
    out[...] = picked if channels is None else picked[:, :, channels]

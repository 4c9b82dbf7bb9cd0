"""Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions: 16 GEMMs of (K, C) x (C, tiles), 2.25x fewer MACs.

The output is cut into 2x2 tiles (``tiles_h`` x ``tiles_w``, the last ones cropped); each reads a 4x4 patch
of the zero-padded input. With the standard matrices (Lavin & Gray, 2016)

    U = G g G^T (weights, once at load),   V = B^T d B (input patches),   Y = A^T (U . V) A (output tiles),

the element-wise product over channels becomes, for each of the 16 positions xi of the 4x4 transformed
tile, one GEMM ``M[xi] = U[xi] @ V[xi]`` with U[xi]: (K, C), V[xi]: (C, T), T = tiles. The transforms use
only additions (and the weight transform halves), so the result matches direct convolution to float32
rounding (relative error ~1e-6 on unit-scale data).

Layouts: U: float32 (16, K, C); V: (16, S, T) for S selected input channels; M: (16, R, T) for R
selected output rows; T = tiles_h * (tiles_w + 1): tile (ty, tx) is column ty*(tiles_w + 1) + tx, and the
last column of each tile row is padding (computed, never used) that lets the numba transforms run one
long loop over all tiles (see parsicore.kernels.numba_backend.winograd). Gated convs gather U's rows and
columns (active output and input channels) and transform only active input channels and active output rows.
"""

from __future__ import annotations

import numpy as np

from parsicore.kernels.base import Activation, KernelContext, apply_activation

_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])

#: Below these sizes the transforms cost more than the MACs they save, or the GEMMs become too thin for
#: BLAS to run well. MIN_TILES: measured on the development machine (AMD EPYC Zen 3, AVX2, numpy's OpenBLAS,
#: numba, 1 thread, both paths alternated on the same conv): with 16 tiles (7x7, 8x8 outputs) im2col was as
#: fast or faster at every size from 32->64 to 512->512 channels (1.0-1.4x); with 25 tiles it won up to
#: 128->128 and tied above; with 36 tiles and more Winograd won from 64->128 channels (0.70-0.85x). An earlier
#: rule (Zen 4) also took Winograd at 16-35 tiles when K*C <= 128*128: those convs ran 1.06-1.3x slower here.
MIN_CHANNELS = 16
MIN_TILES = 36
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


def tiles(ho: int, wo: int) -> tuple[int, int]:
    """(tiles_h, tiles_w): 2x2 output tiles covering an ho x wo output."""
    return (ho + 1) // 2, (wo + 1) // 2


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


def transform_weights(weight: np.ndarray) -> np.ndarray:
    """weight: float32 (K, C, 3, 3) -> U: float32 (16, K, C), U[4a+b] = (G g G^T)[a, b] (computed in float64)."""
    u = np.einsum("ai,kcij,bj->abkc", _G, weight.astype(np.float64), _G)
    k, c = weight.shape[:2]
    return np.ascontiguousarray(u.reshape(16, k, c), dtype=np.float32)


def input_transform(x: np.ndarray, channels: np.ndarray | None, top: int, left: int, tiles_h: int, tiles_w: int,
                    out: np.ndarray, context: KernelContext | None = None) -> None:
    """One image. x: float32 (C, H, W); channels: int64 (S,) or None -> out: float32 (16, S, T) = B^T d B of
    every tile's 4x4 patch of the zero-padded input (padded row/col 0 is input row -top / col -left)."""
    if channels is not None:
        x = x[channels]
    s, h, w = x.shape
    rows, cols = 2 * tiles_h + 2, 2 * tiles_w + 2
    padded = np.zeros((s, rows, cols), dtype=np.float32)
    # The part of the input the padded window covers (pads may exceed what the tiles read).
    r0, c0 = max(0, -top), max(0, -left)
    r1, c1 = min(h, rows - top), min(w, cols - left)
    if r1 > r0 and c1 > c0:
        padded[:, r0 + top:r1 + top, c0 + left:c1 + left] = x[:, r0:r1, c0:c1]
    d = [[padded[:, i:i + 2 * tiles_h:2, j:j + 2 * tiles_w:2] for j in range(4)] for i in range(4)]
    # B^T d: rows; then (B^T d) B: columns.
    e = [[d[0][j] - d[2][j] for j in range(4)], [d[1][j] + d[2][j] for j in range(4)],
         [d[2][j] - d[1][j] for j in range(4)], [d[1][j] - d[3][j] for j in range(4)]]
    grid = out.reshape(4, 4, s, tiles_h, tiles_w + 1)
    grid[..., tiles_w] = 0.0  # the padding column: finite, so the GEMM stays free of NaN from old scratch
    v = grid[..., :tiles_w]
    for a in range(4):
        ea = e[a]
        np.subtract(ea[0], ea[2], out=v[a, 0])
        np.add(ea[1], ea[2], out=v[a, 1])
        np.subtract(ea[2], ea[1], out=v[a, 2])
        np.subtract(ea[1], ea[3], out=v[a, 3])


def output_transform(m: np.ndarray, rows: np.ndarray | None, bias: np.ndarray | None, act: Activation | None,
                     tiles_h: int, tiles_w: int, y: np.ndarray, context: KernelContext | None = None) -> None:
    """m: float32 (16, R, T), the products for output channels ``rows`` (int64 (R,), sorted; None = all K)
    -> y: float32 (K, Ho, Wo), C-contiguous: y[rows] = act(A^T m A + bias) cropped to (Ho, Wo); other rows 0."""
    k, ho, wo = y.shape
    r = m.shape[1]
    t = m.reshape(4, 4, r, tiles_h, tiles_w + 1)[..., :tiles_w]
    s0 = [t[0, b] + t[1, b] + t[2, b] for b in range(4)]
    s1 = [t[1, b] - t[2, b] - t[3, b] for b in range(4)]
    full = np.empty((r, tiles_h, 2, tiles_w, 2), dtype=np.float32)
    for i, s in enumerate((s0, s1)):
        full[:, :, i, :, 0] = s[0] + s[1] + s[2]
        full[:, :, i, :, 1] = s[1] - s[2] - s[3]
    values = full.reshape(r, 2 * tiles_h, 2 * tiles_w)[:, :ho, :wo]
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
    """u: float32 (16, K, C); rows: int64 (R,) or None; channels: int64 (S,) or None -> out: (16, R, S)."""
    picked = u if rows is None else u[:, rows]
    out[...] = picked if channels is None else picked[:, :, channels]

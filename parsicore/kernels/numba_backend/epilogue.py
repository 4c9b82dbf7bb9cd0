"""The fused epilogue in Numba: bias + activation, in place, or scattered into the active output rows.

Each activation has its own loop (the branch on the activation is outside the element loop), so LLVM
vectorises every one of them; the definitions are those of :func:`parsicore.kernels.base.apply_activation`
in float32 (NaN passes through ReLU, clip and leaky ReLU as with NumPy's maximum/clip).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from parsicore.kernels.base import ACTIVATION_KINDS, Activation, all_indices  # noqa: F401 (re-exported to the numba kernels)
from parsicore.kernels.numba_backend.parallel import jit, jit_inline, serial_and_parallel

# Activation codes the kernels branch on: 0 = none, then ACTIVATION_KINDS in order (immutable ints, which
# Numba compiles in as constants).
RELU, CLIP, LEAKY_RELU, SIGMOID, TANH, HARD_SIGMOID, HARD_SWISH, SILU = (
    ACTIVATION_KINDS.index(kind) + 1
    for kind in ("relu", "clip", "leaky_relu", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "silu")
)

ActivationParams = tuple[int, np.float32, np.float32, np.float32, np.float32]

#: An epilogue call's work (against parallel.MIN_PARALLEL_WORK) is its element count divided by this: one read,
#: one write and a few flops per element, so on cores that share the memory bus a parallel build saves little
#: and its reader pays for the half written on the other core. MobileNetV2's block1.expand (1.2M elements) was
#: the one epilogue of the benchmark models past 2^20: 2 threads, parallel against serial numba (python
#: scripts/profile_steps.py mobilenet_v2.h5 --serial-numba), it took 1098 against 919 us and the depthwise conv
#: reading it 826 against 554. Whole model, 2 threads (python scripts/ab_settings.py mobilenet_v2.h5 --a
#: "epilogue.EPILOGUE_WORK_DIVISOR=1" --b "epilogue.EPILOGUE_WORK_DIVISOR=8"): 0.94x; its 50 %-off variant 1.00x.
EPILOGUE_WORK_DIVISOR = 8


@functools.lru_cache(maxsize=256)
def zeros(n: int) -> np.ndarray:
    """float32 zeros (n,), the bias of a bias-less kernel (cached and shared like all_indices)."""
    return np.zeros(n, dtype=np.float32)


@functools.lru_cache(maxsize=256)
def activation_params(act: Activation | None) -> ActivationParams:
    """(code, alpha, beta, lo, hi) for the kernels, parameters as float32 so no loop widens to float64.
    Cached: called on every kernel call with the kernel's (frozen, hashable) Activation."""
    f32 = np.float32
    if act is None:
        return 0, f32(0.0), f32(0.0), f32(0.0), f32(0.0)
    if act.kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation {act.kind!r}")
    return ACTIVATION_KINDS.index(act.kind) + 1, f32(act.alpha), f32(act.beta), f32(act.lo), f32(act.hi)


@jit
def sigmoid_value(v):
    """float32 sigmoid as apply_activation: exp of -|v| never overflows."""
    e = np.exp(-abs(v))
    one = np.float32(1.0)
    return one / (one + e) if v >= 0 else e / (one + e)


@jit
def activate_value(v, code, alpha, beta, lo, hi):
    """One float32 value through activation ``code`` (for kernels that finish one value at a time)."""
    if code == RELU:
        return np.float32(0.0) if v < 0 else v
    if code == CLIP:
        return lo if v < lo else (hi if v > hi else v)
    if code == LEAKY_RELU:
        return v * alpha if v < 0 else v
    if code == SIGMOID:
        return sigmoid_value(v)
    if code == TANH:
        return np.tanh(v)
    if code == HARD_SIGMOID:
        t = v * alpha + beta
        return np.float32(0.0) if t < 0 else (np.float32(1.0) if t > 1 else t)
    if code == HARD_SWISH:
        t = v + np.float32(3.0)
        t = np.float32(0.0) if t < 0 else (np.float32(6.0) if t > 6 else t)
        return v * (t / np.float32(6.0))
    if code == SILU:
        return v * sigmoid_value(v)
    return v


@jit_inline
def clamp_bounds(code, lo, hi):
    """(whether activation ``code`` is a clamp, its float32 bounds): no activation -inf/+inf, ReLU 0/+inf, clip
    lo/hi. Kernels that finish values in their own loops apply ``lo_f if v < lo_f else (hi_f if v > hi_f else v)``
    (finish_span's selects: a NaN passes) where this says so, and finish_span otherwise."""
    clamps = code == 0 or code == RELU or code == CLIP
    lo_f = np.float32(-np.inf) if code == 0 else (np.float32(0.0) if code == RELU else lo)
    hi_f = np.float32(np.inf) if code != CLIP else hi
    return clamps, lo_f, hi_f


@jit_inline
def finish_span(src, s0, dst, d0, count, b, code, alpha, beta, lo, hi):
    """dst[d0 + i] = act(src[s0 + i] + b) for i < count: float32 1-D arrays, offsets and count unsigned (src may
    be dst). Kernels finishing many short rows index one flat array with this instead of slicing a view per
    row: in Numba a view costs a reference-count update, which at rows of 7 to 49 values cost more than the
    row's arithmetic."""
    n = np.uint64(count)
    if code == 0:
        for i in range(n):
            dst[d0 + i] = src[s0 + i] + b
    elif code == RELU:
        for i in range(n):
            v = src[s0 + i] + b
            dst[d0 + i] = np.float32(0.0) if v < 0 else v
    elif code == CLIP:
        for i in range(n):
            v = src[s0 + i] + b
            dst[d0 + i] = lo if v < lo else (hi if v > hi else v)
    elif code == LEAKY_RELU:
        for i in range(n):
            v = src[s0 + i] + b
            dst[d0 + i] = v * alpha if v < 0 else v
    elif code == HARD_SWISH:
        for i in range(n):
            v = src[s0 + i] + b
            t = v + np.float32(3.0)
            t = np.float32(0.0) if t < 0 else (np.float32(6.0) if t > 6 else t)
            dst[d0 + i] = v * (t / np.float32(6.0))
    else:
        for i in range(n):
            dst[d0 + i] = activate_value(src[s0 + i] + b, code, alpha, beta, lo, hi)


@jit_inline
def finish_row(src, dst, b, code, alpha, beta, lo, hi):
    """dst[i] = act(src[i] + b) for one row (float32 1-D, same length; src may be dst)."""
    finish_span(src, np.uint64(0), dst, np.uint64(0), dst.shape[0], b, code, alpha, beta, lo, hi)


@serial_and_parallel
def bias_activation_rows(y, start, stop, bias, has_bias, code, alpha, beta, lo, hi):
    """y: float32 (R, P), C-contiguous, columns [start, stop) of every row in place: y[r, c] = act(y[r, c] +
    bias[r % len(bias)]) (bias repeats per image; [0, P) for whole rows, a column block for a blocked conv's
    block). Rows by flat offset, no row views (see finish_span)."""
    rows, p = y.shape
    k = bias.shape[0]
    yf = y.reshape(-1)
    n = np.uint64(stop - start)
    for r in numba.prange(rows):
        b = bias[r % k] if has_bias else np.float32(0.0)
        first = np.uint64(r) * np.uint64(p) + np.uint64(start)
        finish_span(yf, first, yf, first, n, b, code, alpha, beta, lo, hi)


@serial_and_parallel
def scatter_rows(values, rows, bias, has_bias, code, alpha, beta, lo, hi, y):
    """values: float32 (R, P), C-contiguous; rows: int64 (R,) sorted -> y: float32 (K, P), C-contiguous:
    y[rows[r]] = act(values[r] + bias[rows[r]]), every other row of y 0. Rows by flat offset (see finish_span)."""
    k, p = y.shape
    n_rows = rows.shape[0]
    vf = values.reshape(-1)
    yf = y.reshape(-1)
    up = np.uint64(p)
    for out_row in numba.prange(k):
        r = np.searchsorted(rows, out_row)
        dst = np.uint64(out_row) * up
        if r < n_rows and rows[r] == out_row:
            b = bias[out_row] if has_bias else np.float32(0.0)
            finish_span(vf, np.uint64(r) * up, yf, dst, p, b, code, alpha, beta, lo, hi)
        else:
            for i in range(up):
                yf[dst + i] = 0.0

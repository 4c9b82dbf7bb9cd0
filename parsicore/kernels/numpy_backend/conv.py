"""Conv in NumPy: im2col + BLAS GEMM; 1x1 stride-1 convs as a plain GEMM; depthwise as a loop over taps.

The factory packs the weight once into one GEMM matrix per group, ``(groups, K/groups, C/groups*kh*kw)``,
whose columns follow the im2col row order (channel, tap row, tap column). :class:`ConvKernel` holds the
orchestration shared with the numba backend (dense vs gated, which rows and columns of the GEMM to use,
one BLAS call per image); the arithmetic around the GEMM lives in microkernels (:class:`ConvMicrokernels`)
that a backend may replace. Per image, im2col columns, gathered weights and the gated GEMM's result are
written into the plan's per-thread scratch memory (:class:`~parsicore.kernels.base.KernelContext`), so a
run allocates no large buffer after its thread's first call.

Gating (see :mod:`parsicore.kernels.base`): with ``active_out`` only the listed output channels are
computed (a GEMM on those rows of the packed weight, gathered) and the others written as 0; with
``active_in`` the input channels not listed are all zero, so their im2col rows and weight columns are
skipped (gathered GEMM on active rows and columns). A depthwise output channel whose input channel is
inactive is ``act(bias)`` everywhere and is filled without computing.

Channel-compact layouts (``compact_out`` / ``compact_in``, set by the runtime where every reader of a tensor
knows them): a compact output holds, per image, only the R active output channels, in order, in its first
R planes (the rest of the buffer is not written); a compact input holds the S channels of ``active_in`` in
its first S planes. A gated conv then writes R planes instead of K (no zero planes, no scatter), and its
reader reads S planes in place (no gather of input channels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from parsicore.kernels.base import Activation, KernelContext, KernelSpec, all_indices, apply_activation
from parsicore.kernels.numpy_backend import winograd
from parsicore.threads import run_chunks

#: GEMMs of at least this many MACs are split over the run's threads (below, waking a helper costs more).
#: Tuned with MIN_PARALLEL_WORK (numba_backend/parallel.py) on 2 cores (scripts/bench_thread_thresholds.py):
#: at 2^21 every 28x28/32x32 model ran 10-40 % slower with 2 threads than with 1 (Zen 3 VM). On a Xeon VM,
#: a split cost ~40-50 us of hand-off and MobileNetV2's 7-11M-MAC GEMMs lost when split (scripts/bench_kernels.py
#: --only gemm_splits: 144x24x3136 202 us in one call, 250 us in 4 chunks on 2 threads): at 2^25 no
#: MobileNetV2 GEMM is split and ResNet-18 keeps its gain (2 threads / 1: 0.76 at 2^23, 0.77 at 2^25).
PARALLEL_GEMM_MACS = 1 << 25
#: An F(4x4) Winograd conv at least this large (MACs of its GEMMs) runs on all the run's threads as a whole: its
#: input transform, its GEMMs (split by whole slices, which share no operand) and its output transform. F(4x4)
#: cut the work of ResNet-18's layers 1-2 below every per-kernel threshold, so with 2 threads they ran serially
#: (and no faster than with 1); deciding per conv also keeps each kernel's output on the cores its reader runs
#: on. Against never forcing (python scripts/ab_settings.py MODEL --threads 2 --a
#: "conv.PARALLEL_WINOGRAD_MACS=4611686018427387904" --b "conv.PARALLEL_WINOGRAD_MACS=16777216", Xeon VM):
#: ResNet-18 0.93-0.94x at 2^24 (0.92x at 2^23); its 50 %-off variant 0.99-1.00x at 2^24 but 1.04-1.05x at 2^23
#: (its 15M-MAC gated layer-1 convs lost); 25 % and 75 % off 0.98x and 1.00x. F(2x2) convs keep the per-kernel
#: rules: forced whole in a draft of this change, ResNet-18's 14x14 ones ran 1.05-1.1x slower per step (their
#: transforms are light; a one-off check).
PARALLEL_WINOGRAD_MACS = 1 << 24
#: Fewest rows per row block when a GEMM is split by rows (else it is split by columns).
GEMM_CHUNK = 32
#: Row or column blocks per thread of a split 2-D GEMM. Each block packs the whole shared operand again, so one
#: per thread (with blocks taken on demand a late helper still costs at most one block). Alone, 2 threads
#: (python scripts/bench_kernels.py --only gemm_splits): 512x4608x49 1223 us in 2 row blocks, 1337 in 4;
#: 256x2304x196 984 vs 1128; the stem's 64x147x12544 1243 vs 1213 in column blocks. In the model (python
#: scripts/ab_settings.py MODEL --threads 2 --a "conv.GEMM_CHUNKS_PER_THREAD=2" --b "conv.GEMM_CHUNKS_PER_THREAD=1"):
#: ResNet-18 0.96-0.98x, its 50 %-off variant 0.99x, MobileNetV2 and the VGG-style CNN 1.00x.
GEMM_CHUNKS_PER_THREAD = 1

#: A dense im2col conv (groups 1) whose column matrix has at least this many elements (ResNet-18's 7x7 stem:
#: 1.8M) runs in blocks of output rows, each block's column matrix about BLOCK_COLUMNS elements (512 KB, so it
#: and its output block stay in a 2 MB L2): its im2col, GEMM and epilogue run back to back, and with threads
#: the blocks go to the threads. ResNet-18's stem (python scripts/profile_steps.py resnet18.h5 --a-set
#: conv.BLOCKED_IM2COL_MIN=4611686018427387904): 3.89 -> 2.59 ms at 1 thread, 2.36 -> 1.87 ms at 2, the max
#: pool reading it 0.14-0.17 ms slower. BLOCK_COLUMNS 2^16 and 2^18 (--a-set conv.BLOCK_COLUMNS=...) left the
#: stem 1.07x and 1.05x slower than 2^17. Blocking 1x1 convs the same way (MobileNetV2's expands) made them and
#: their readers 1.13-1.38x slower (a one-off check), so only im2col convs this large are blocked.
BLOCKED_IM2COL_MIN = 1 << 20
BLOCK_COLUMNS = 1 << 17

#: Per-channel work of a gated depthwise conv (see ``depthwise`` microkernels): write 0, write act(bias), compute.
MODE_ZERO, MODE_BIAS, MODE_COMPUTE = 0, 1, 2


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one Conv: input (c, h, w), output (k, ho, wo), kernel, stride, dilation, pads, groups."""

    c: int
    h: int
    w: int
    k: int
    ho: int
    wo: int
    kh: int
    kw: int
    stride_h: int
    stride_w: int
    dil_h: int
    dil_w: int
    top: int
    left: int
    bottom: int
    right: int
    groups: int

    @classmethod
    def from_spec(cls, spec: KernelSpec) -> ConvGeometry:
        c, h, w = spec.in_shapes[0]
        k, ho, wo = spec.out_shapes[0]
        _, _, kh, kw = np.shape(spec.weights["weight"])
        a = spec.attrs
        top, left, bottom, right = a.pads
        return cls(c, h, w, k, ho, wo, kh, kw, a.stride[0], a.stride[1], a.dilation[0], a.dilation[1],
                   top, left, bottom, right, a.groups)

    @property
    def cg(self) -> int:
        """Input channels per group."""
        return self.c // self.groups

    @property
    def kg(self) -> int:
        """Output channels per group."""
        return self.k // self.groups

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.c == self.k

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the im2col matrix is the input itself."""
        return (self.kh, self.kw, self.stride_h, self.stride_w) == (1, 1, 1, 1) and not any(
            (self.top, self.left, self.bottom, self.right))

    @property
    def pixels(self) -> int:
        """Output positions per image (Ho*Wo), the GEMM's column count."""
        return self.ho * self.wo


def conv_path(geom: ConvGeometry) -> str:
    """The kernel path a Conv takes: ``depthwise``, ``gemm_1x1``, ``winograd_3x3`` or ``im2col_gemm``."""
    if geom.is_depthwise:
        return "depthwise"
    if geom.is_pointwise:
        return "gemm_1x1"
    g = geom
    if winograd.pays(g.kh, g.kw, (g.stride_h, g.stride_w), (g.dil_h, g.dil_w), g.groups, g.c, g.k, g.ho, g.wo):
        return "winograd_3x3"
    return "im2col_gemm"


# --- NumPy microkernels -------------------------------------------------------------------------------


def pad_images(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """x: float32 (N, C, H, W) -> (N, C, H+top+bottom, W+left+right) with zeros around; x itself without pads."""
    if not any((geom.top, geom.left, geom.bottom, geom.right)):
        return x
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + geom.top + geom.bottom, w + geom.left + geom.right), dtype=np.float32)
    padded[:, :, geom.top:geom.top + h, geom.left:geom.left + w] = x
    return padded


def valid_range(out_size: int, in_size: int, stride: int, offset: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose input position ``o*stride + offset`` lies in [0, in_size) (lo == hi: none)."""
    lo = max(0, (stride - 1 - offset) // stride)
    hi = min(out_size, (in_size - 1 - offset) // stride + 1)
    return lo, max(lo, hi)


def im2col(x: np.ndarray, channels: np.ndarray | None, geom: ConvGeometry, out: np.ndarray,
           context: KernelContext | None = None) -> None:
    """One image. x: float32 (C, H, W), any strides; channels: int64 (S,) or None (all) -> out: float32
    (S*kh*kw, Ho*Wo), C-contiguous, overwritten. Row ``(s*kh + i)*kw + j`` holds tap (i, j) of channel
    ``channels[s]`` at every output position (0 where the tap falls on padding)."""
    g = geom
    s = x.shape[0] if channels is None else channels.shape[0]
    cols = out.reshape(s, g.kh, g.kw, g.ho, g.wo)
    for i in range(g.kh):
        oh0, oh1 = valid_range(g.ho, g.h, g.stride_h, i * g.dil_h - g.top)
        for j in range(g.kw):
            ow0, ow1 = valid_range(g.wo, g.w, g.stride_w, j * g.dil_w - g.left)
            tap = cols[:, i, j]
            if (oh0, oh1, ow0, ow1) != (0, g.ho, 0, g.wo):
                tap.fill(0.0)
            if oh0 >= oh1 or ow0 >= ow1:
                continue
            ih0 = oh0 * g.stride_h + i * g.dil_h - g.top
            iw0 = ow0 * g.stride_w + j * g.dil_w - g.left
            rows = slice(ih0, ih0 + (oh1 - oh0 - 1) * g.stride_h + 1, g.stride_h)
            columns = slice(iw0, iw0 + (ow1 - ow0 - 1) * g.stride_w + 1, g.stride_w)
            window = x[:, rows, columns] if channels is None else x[channels, rows, columns]
            tap[:, oh0:oh1, ow0:ow1] = window


def bias_activation(y: np.ndarray, bias: np.ndarray | None, act: Activation | None,
                    context: KernelContext | None = None) -> None:
    """y: float32 (N, K, P) in place: add bias (K,) per channel, then the activation."""
    if bias is not None:
        np.add(y, bias[None, :, None], out=y)
    apply_activation(y, act)


def bias_activation_block(y: np.ndarray, start: int, stop: int, bias: np.ndarray | None, act: Activation | None,
                          context: KernelContext | None = None) -> None:
    """y: float32 (K, P), columns [start, stop) in place: add bias (K,) per row, then the activation."""
    bias_activation(y[None, :, start:stop], bias, act)


def scatter_bias_activation(values: np.ndarray, rows: np.ndarray, bias: np.ndarray | None, act: Activation | None,
                            y: np.ndarray, context: KernelContext | None = None) -> None:
    """values: float32 (R, P), the GEMM on output rows ``rows`` (int64 (R,), sorted) -> y: float32 (K, P),
    C-contiguous: y[rows] = act(values + bias[rows]), every other row 0. values may be modified."""
    bias_activation(values[None], None if bias is None else bias[rows], act)
    y.fill(0.0)
    y[rows] = values


def gather_weights(taps: np.ndarray, rows: np.ndarray | None, channels: np.ndarray | None, out: np.ndarray,
                   context: KernelContext | None = None) -> None:
    """taps: float32 (K, C, T); rows: int64 (R,) or None; channels: int64 (S,) or None -> out: float32
    (R, S*T), C-contiguous: the packed GEMM weight restricted to those rows and input channels."""
    r = taps.shape[0] if rows is None else rows.shape[0]
    s = taps.shape[1] if channels is None else channels.shape[0]
    picked = taps if rows is None else taps[rows]
    out.reshape(r, s, taps.shape[2])[...] = picked if channels is None else picked[:, channels]


def zero_other_rows(y: np.ndarray, rows: np.ndarray) -> None:
    """y: float32 (K, P) C-contiguous; every row not in ``rows`` (sorted distinct int64) set to 0 (a gated conv's
    inactive output planes)."""
    inactive = np.ones(y.shape[0], dtype=bool)
    inactive[rows] = False
    y[inactive] = 0.0


def gather_rows(src: np.ndarray, rows: np.ndarray, out: np.ndarray, context: KernelContext | None = None) -> None:
    """src: float32 (B, K, L), C-contiguous; rows: int64 (R,) -> out: float32 (B, R, L) = src[:, rows]."""
    np.take(src, rows, axis=1, out=out)


def _depthwise_taps(x: np.ndarray, filters: np.ndarray, geom: ConvGeometry, out: np.ndarray) -> None:
    """x: float32 (N, C, H, W); filters: (C, kh, kw) -> out: float32 (N, C, Ho, Wo), no bias."""
    padded = pad_images(x, geom)
    last_h = (geom.ho - 1) * geom.stride_h + 1
    last_w = (geom.wo - 1) * geom.stride_w + 1
    product = np.empty_like(out)
    for i in range(geom.kh):
        for j in range(geom.kw):
            h0, w0 = i * geom.dil_h, j * geom.dil_w
            window = padded[:, :, h0:h0 + last_h:geom.stride_h, w0:w0 + last_w:geom.stride_w]
            tap = filters[None, :, i, j, None, None]
            if i == 0 and j == 0:
                np.multiply(window, tap, out=out)
            else:
                np.multiply(window, tap, out=product)
                np.add(out, product, out=out)


def depthwise(x: np.ndarray, filters: np.ndarray, bias: np.ndarray | None, act: Activation | None,
              modes: np.ndarray | None, geom: ConvGeometry, out: np.ndarray,
              context: KernelContext | None = None, channels: np.ndarray | None = None) -> None:
    """Depthwise conv with its epilogue. x: float32 (N, C, H, W); filters: (C, kh, kw); bias: (C,) or None;
    modes: int8 (N, C) of MODE_* or None (compute all) -> out: float32 (N, C, Ho, Wo), written completely.
    channels: int64 (C,) or None: plane c takes filters[channels[c]] and bias[channels[c]] (filters and bias
    then (F, kh, kw) and (F,): a gated conv's active channels, which a backend may read in place)."""
    if channels is not None:
        filters, bias = filters[channels], None if bias is None else bias[channels]
    n = x.shape[0]
    if modes is None:
        _depthwise_taps(x, filters, geom, out)
        bias_activation(out.reshape(n, geom.c, geom.pixels), bias, act)
        return
    for i in range(n):
        compute = np.flatnonzero(modes[i] == MODE_COMPUTE)
        constant = np.flatnonzero(modes[i] == MODE_BIAS)
        out[i] = 0.0
        if compute.size:
            part = np.empty((1, compute.size, geom.ho, geom.wo), dtype=np.float32)
            _depthwise_taps(x[i:i + 1, compute], filters[compute], geom, part)
            bias_activation(part.reshape(1, compute.size, geom.pixels), None if bias is None else bias[compute], act)
            out[i, compute] = part[0]
        if constant.size:
            values = np.zeros((1, constant.size, 1), dtype=np.float32)
            bias_activation(values, None if bias is None else bias[constant], act)
            out[i, constant] = values[0, :, :, None]


@dataclass(frozen=True)
class PackedGemm:
    """A backend's GEMM on weights packed for it, with the epilogue fused (the numba backend's
    :mod:`~parsicore.kernels.numba_backend.packed_gemm`), used where ``pays`` says it beats BLAS."""

    #: (rows M, depth K, columns N) -> whether this GEMM beats BLAS at that shape.
    pays: Callable[[int, int, int], bool]
    #: (rows M, depth K, columns N) -> whether a gated GEMM on gathered, packed weights beats gather + BLAS.
    gathered_pays: Callable[[int, int, int], bool]
    #: (a float32 (M, K)) -> packed weights, made once at load.
    pack: Callable[[np.ndarray], Any]
    #: (taps (K, C, T), rows, channels, scratch, context) -> packed weights of the active rows and columns.
    pack_gathered: Callable[..., Any]
    #: (rows, depth) -> scratch elements pack_gathered needs.
    packed_size: Callable[[int, int], int]
    #: (packed, m, b (K, N), out (R, N), bias (R,) | None, act, context, rows (m,) | None, steps=(S,) | None):
    #: out[rows] = act(A @ b + bias[rows]), with ``steps`` A[:, steps] read in place (b then (S, N)).
    run: Callable[..., None]
    #: (packed) -> the float32 (M, K) matrix again (a conv that keeps only packed weights rebuilds its plain ones
    #: on its first gated call).
    unpack: Callable[[Any], np.ndarray]
    #: (u float32 (X, M, K)) -> packed weights of a stack of GEMMs (Winograd's slices), made once at load.
    pack_slices: Callable[[np.ndarray], Any]
    #: (packed) -> the float32 (X, M, K) stack again.
    unpack_slices: Callable[[Any], np.ndarray]
    #: (packed, b (X, K, N), out (X, M, N), context, parallel, steps=(S,) | None): out[x] = U[x] @ b[x], with
    #: ``steps`` U[x][:, steps] read in place (b then (X, S, N)).
    run_slices: Callable[..., None]
    #: (channels int64 (S,) sorted, taps T) -> int64 (S*T,) c*T + t: the steps of the active input channels.
    channel_steps: Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class ConvMicrokernels:
    """The arithmetic a backend supplies; signatures as the NumPy functions of the same names. Each takes
    the kernel's context last (scratch memory, thread budget)."""

    im2col: Callable[..., None]
    depthwise: Callable[..., None]
    bias_activation: Callable[..., None]
    #: (y (K, P), start, stop, bias, act, context): the epilogue on one column block (a blocked conv's rows).
    bias_activation_block: Callable[..., None]
    scatter_bias_activation: Callable[..., None]
    gather_weights: Callable[..., None]
    #: Winograd F(2x2, 3x3) and F(4x4, 3x3): signatures as in parsicore.kernels.numpy_backend.winograd.
    winograd_input: Callable[..., None]
    winograd_output: Callable[..., None]
    winograd_gather: Callable[..., None]
    #: (src (B, K, L), rows (R,), out (B, R, L), context): whole rows copied (gated 1x1 inputs, weight rows).
    gather_rows: Callable[..., None]
    #: A GEMM of the backend's own for the shapes where it beats BLAS (None: BLAS for every GEMM).
    packed_gemm: PackedGemm | None = None
    #: (w (M, K) or (X, M, K), rows (R,), b ([X,] K, N), out ([X,] D, N), bias (D,) | None, act, context,
    #: dest=(R,) | None, parallel=None): out[..., dest, :] = act(w[..., rows, :] @ b + bias[dest]), the active
    #: weight rows read in place (no gather), where row_gemm_pays(K, N). None: gathered rows and BLAS.
    row_gemm: Callable[..., None] | None = None
    row_gemm_pays: Callable[[int, int], bool] | None = None
    #: (K, N) -> whether an im2col or 1x1 GEMM, dense or gated by output rows, takes row_gemm as wide and shallow
    #: (None: never).
    row_gemm_wide: Callable[[int, int], bool] | None = None
    #: (y (K, P), rows (R,) sorted): the rows not in ``rows`` set to 0.
    zero_other_rows: Callable[[np.ndarray, np.ndarray], None] = zero_other_rows
    #: (a, b, out, threads, by_rows) -> bool: out = a @ b split over the backend's own thread pool (2-D by row
    #: or column blocks, a stack by slices); False where it cannot (the helper threads split it then). None: never.
    split_matmul: Callable[[np.ndarray, np.ndarray, np.ndarray, int, bool], bool] | None = None
    #: () -> the fewest MACs of a GEMM split_matmul takes (below, one call on the calling thread).
    split_min_macs: Callable[[], int] | None = None
    #: (x (C, H, W), weights (K, C*kh*kw), blocks int64 (B, 5), geom, bias, act, y (K, P), context) -> bool: one
    #: image of a blocked im2col conv with its blocks over the backend's pool; False where it cannot. None: never.
    blocked_conv: Callable[..., bool] | None = None


NUMPY_MICROKERNELS = ConvMicrokernels(im2col=im2col, depthwise=depthwise, bias_activation=bias_activation,
                                      bias_activation_block=bias_activation_block,
                                      scatter_bias_activation=scatter_bias_activation,
                                      gather_weights=gather_weights, winograd_input=winograd.input_transform,
                                      winograd_output=winograd.output_transform,
                                      winograd_gather=winograd.gather_transformed, gather_rows=gather_rows)


# --- Orchestration ------------------------------------------------------------------------------------


def _index_lists(lists: Sequence[np.ndarray] | None, n: int, limit: int, what: str) -> list[np.ndarray] | None:
    if lists is None:
        return None
    if len(lists) != n:
        raise ValueError(f"{what} has {len(lists)} entries for a batch of {n}")
    out = []
    for channels in lists:
        if type(channels) is not np.ndarray or channels.dtype != np.int64 or channels.ndim != 1:
            channels = np.asarray(channels, dtype=np.int64).reshape(-1)
        if channels.size and (channels[0] < 0 or channels[-1] >= limit):
            raise ValueError(f"{what} holds a channel outside 0..{limit - 1}")
        out.append(channels)
    return out


class ConvKernel:
    """One Conv with packed weights: ``kernel([x], [y], active_out=None, active_in=None)``.

    x: float32 (N, C, H, W), any strides; y: float32 (N, K, Ho, Wo), C-contiguous, overwritten.
    ``compact_in`` / ``compact_out`` (module docstring): groups 1 or depthwise only; a depthwise conv reading a
    compact input must write a compact output of the same channels (active_out == active_in).
    """

    supports_compact = True

    def __init__(self, spec: KernelSpec, micro: ConvMicrokernels) -> None:
        geom = ConvGeometry.from_spec(spec)
        weight = np.asarray(spec.weights["weight"], dtype=np.float32)
        if weight.shape != (geom.k, geom.cg, geom.kh, geom.kw):
            raise ValueError(f"weight shape {weight.shape} does not match the conv geometry {geom}")
        self.geom = geom
        self.path = conv_path(geom)
        self.micro = micro
        self.context = spec.kernel_context()
        self.activation = spec.activation
        # One GEMM matrix per group: rows are output channels, columns follow im2col's row order.
        self.packed = np.ascontiguousarray(weight.reshape(geom.groups, geom.kg, geom.cg * geom.kh * geom.kw))
        self.packed_2d = self.packed.reshape(geom.k, geom.cg * geom.kh * geom.kw)
        # The same numbers as (K, C/groups, kh*kw): gated paths gather rows and whole-channel column blocks.
        self.taps = self.packed.reshape(geom.k, geom.cg, geom.kh * geom.kw)
        self.filters = self.packed.reshape(geom.c, geom.kh, geom.kw) if geom.is_depthwise else None
        self._depthwise_sub: dict[int, ConvGeometry] = {}  # active count -> its geometry (_depthwise_compact)
        self.row_blocks = _row_blocks(geom) if (
            self.path == "im2col_gemm" and geom.groups == 1 and geom.c * geom.kh * geom.kw * geom.pixels
            >= BLOCKED_IM2COL_MIN) else None
        #: The row blocks as int64 (B, 5): first input row, last + 1, first output column, last + 1, padding above.
        self.block_table = None if self.row_blocks is None else np.array(
            [(r0, r1, p0, p1, sub.top) for r0, r1, p0, p1, sub in self.row_blocks], dtype=np.int64).reshape(-1, 5)
        bias = spec.weights.get("bias")
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(geom.k)
        packed_gemm = micro.packed_gemm
        #: The weights packed for the backend's own GEMM, where a dense call takes it (else None: BLAS).
        self.gemm_panels = packed_gemm.pack(self.packed_2d) if (
            packed_gemm is not None and self.path in ("im2col_gemm", "gemm_1x1") and geom.groups == 1
            and self.row_blocks is None and packed_gemm.pays(geom.k, geom.c * geom.kh * geom.kw, geom.pixels)) else None
        if self.gemm_panels is not None:
            # Only the packed weights are kept (ResNet-18's layer 4: 33 MB less); _taps() rebuilds the plain ones
            # for gated calls. Every other use of them is on paths a packed conv never takes.
            del self.packed, self.packed_2d, self.taps
        self.in_shape = (geom.c, geom.h, geom.w)
        #: Wide and shallow (micro.row_gemm_wide): the dense GEMM and the output-gated ones take the row GEMM.
        self._wide = bool(self.path in ("im2col_gemm", "gemm_1x1") and geom.groups == 1 and self.row_blocks is None
                          and self.gemm_panels is None and micro.row_gemm_wide is not None
                          and micro.row_gemm_wide(geom.c * geom.kh * geom.kw, geom.pixels))
        if self.path == "winograd_3x3":
            #: Output tile size: F(2x2, 3x3) or F(4x4, 3x3) (winograd.tile_size); slices = (m + 2)^2 GEMMs.
            self.winograd_tile = winograd.tile_size(geom.c, geom.k, geom.ho, geom.wo)
            self.winograd_u = winograd.transform_weights(weight, self.winograd_tile)
            self.tiles_h, self.tiles_w = winograd.tiles(geom.ho, geom.wo, self.winograd_tile)
            # Gated calls with few tiles take the gathered im2col GEMM: gathering the transformed weight
            # slices costs more than Winograd saves there (measured at 7x7 outputs). With more tiles, each gated
            # image still takes im2col when its active rows outnumber its active inputs (winograd.gated_pays).
            self.winograd_gated = winograd.tile_columns(self.tiles_h, self.tiles_w) >= winograd.GATED_MIN_COLUMNS
            #: The transformed weights packed for the backend's own GEMM, where the dense call's slices take it.
            self.winograd_packed = packed_gemm.pack_slices(self.winograd_u) if (
                packed_gemm is not None and packed_gemm.pays(
                    geom.k, geom.c, winograd.tile_columns(self.tiles_h, self.tiles_w))) else None
            if self.winograd_packed is not None:
                del self.winograd_u  # kept packed only; _winograd_u() rebuilds it for gated calls

    def __call__(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                 active_out: Sequence[np.ndarray] | None = None,
                 active_in: Sequence[np.ndarray] | None = None,
                 compact_in: bool = False, compact_out: bool = False) -> None:
        x, y = inputs[0], outputs[0]
        g = self.geom
        n = x.shape[0]
        if x.shape[1:] != self.in_shape:
            raise ValueError(f"Conv input has shape {x.shape}, expected (N, {g.c}, {g.h}, {g.w})")
        if y.shape != (n, g.k, g.ho, g.wo) or not y.flags.c_contiguous:
            raise ValueError(f"Conv output must be C-contiguous {(n, g.k, g.ho, g.wo)}, got {y.shape}")
        rows = _index_lists(active_out, n, g.k, "active_out")
        chans = _index_lists(active_in, n, g.c, "active_in")
        compact_in = compact_in and chans is not None
        compact_out = compact_out and rows is not None
        if (compact_in or compact_out) and not (g.groups == 1 or g.is_depthwise):
            raise ValueError("channel-compact layouts need a groups-1 or depthwise conv")
        if self.path == "depthwise" and (compact_in or compact_out):
            for i in range(n):
                self._depthwise_compact(x[i:i + 1], y[i:i + 1], None if rows is None else rows[i],
                                        None if chans is None else chans[i], compact_in)
        elif self.path == "depthwise":
            modes = None if rows is None and chans is None else self._depthwise_modes(n, rows, chans)
            self.micro.depthwise(x, self.filters, self.bias, self.activation, modes, g, y, self.context)
        elif self.path == "winograd_3x3" and (self.winograd_gated or (rows is None and chans is None)):
            for i in range(n):
                rows_i = None if rows is None else rows[i]
                chans_i = None if chans is None else chans[i]
                if (rows_i is None and chans_i is None) or winograd.gated_pays(
                        g.k if rows_i is None else rows_i.size, g.c if chans_i is None else chans_i.size):
                    self._winograd_image(x[i], y[i], rows_i, chans_i, compact_in, compact_out)
                else:
                    self._gated_image(x[i], y[i].reshape(g.k, g.pixels), rows_i, chans_i, compact_in, compact_out)
        elif rows is None and chans is None:
            self._dense(x, y)
        elif g.groups == 1:
            for i in range(n):
                self._gated_image(x[i], y[i].reshape(g.k, g.pixels), None if rows is None else rows[i],
                                  None if chans is None else chans[i], compact_in, compact_out)
        else:
            for i in range(n):
                self._gated_grouped_image(x[i:i + 1], y[i], None if rows is None else rows[i],
                                          None if chans is None else chans[i])

    def _dense(self, x: np.ndarray, y: np.ndarray) -> None:
        g = self.geom
        n = x.shape[0]
        if self.row_blocks is not None:  # before any scratch: the whole column matrix is never allocated
            for i in range(n):
                self._blocked_image(x[i], y[i].reshape(g.k, g.pixels))
            return
        if self.gemm_panels is not None:
            packed_gemm = self._packed_gemm()
            (flat,) = self.context.scratch(0 if g.is_pointwise else g.c * g.kh * g.kw * g.pixels)
            for i in range(n):
                b = self._gemm_operand(x[i], flat)
                packed_gemm.run(self.gemm_panels, g.k, b, y[i].reshape(g.k, g.pixels), self.bias, self.activation,
                                self.context)
            return
        if self._wide:  # the backend's row GEMM on every row, the epilogue fused
            assert self.micro.row_gemm is not None
            (flat,) = self.context.scratch(0 if g.is_pointwise else g.c * g.kh * g.kw * g.pixels)
            every = all_indices(g.k)
            for i in range(n):
                self.micro.row_gemm(self.packed_2d, every, self._gemm_operand(x[i], flat),
                                    y[i].reshape(g.k, g.pixels), self.bias, self.activation, self.context)
            return
        out = y.reshape(n, g.groups, g.kg, g.pixels)
        cols = None
        if not g.is_pointwise:
            (flat,) = self.context.scratch(g.c * g.kh * g.kw * g.pixels)
            cols = flat.reshape(g.groups, g.cg * g.kh * g.kw, g.pixels)
        # One BLAS call per image (per group): np.matmul with out= and a broadcast batch dimension falls off
        # BLAS onto a slow loop (~400x slower), so the batch is never broadcast.
        for i in range(n):
            if cols is None:
                b = x[i].reshape(g.groups, g.cg, g.pixels)
            else:
                self.micro.im2col(x[i], None, g, cols.reshape(-1, g.pixels), self.context)
                b = cols
            for group in range(g.groups):
                self._matmul(self.packed[group], b[group], out[i, group])
        self.micro.bias_activation(y.reshape(n, g.k, g.pixels), self.bias, self.activation, self.context)

    def _blocked_image(self, x: np.ndarray, y: np.ndarray) -> None:
        """One image of a dense im2col conv, block by block of output rows (BLOCKED_IM2COL_MIN). x: (C, H, W);
        y: (K, Ho*Wo) C-contiguous. Each block's column matrix comes from the input rows it reads (a sub-geometry
        with that block's padding), its GEMM writes the block's output columns, then its epilogue runs."""
        g = self.geom
        blocks = self.row_blocks
        assert blocks is not None

        def task(i: int) -> None:
            r0, r1, p0, p1, sub = blocks[i]
            (flat,) = self.context.scratch(g.c * g.kh * g.kw * (p1 - p0))
            cols = flat.reshape(-1, p1 - p0)
            # No context: a block (BLOCK_COLUMNS elements, one row at least) stays under the parallel threshold
            # unless one output row alone passes it, and then parallel.PARALLEL_GATE lets one caller in at a time.
            self.micro.im2col(x[:, r0:r1], None, sub, cols, None)
            np.matmul(self.packed_2d, cols, out=y[:, p0:p1])
            self.micro.bias_activation_block(y, p0, p1, self.bias, self.activation, None)

        threads = self.context.threads
        if threads is not None and threads > 1:
            # A backend's own pool first (numba: the blocks on its threads, no helper thread beside them).
            if self.micro.blocked_conv is not None and self.micro.blocked_conv(
                    x, self.packed_2d, self.block_table, g, self.bias, self.activation, y, self.context):
                return
            run_chunks(task, len(blocks), threads)
        else:
            for i in range(len(blocks)):
                task(i)

    def _gated_image(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None, chans: np.ndarray | None,
                     compact_in: bool = False, compact_out: bool = False) -> None:
        """groups == 1, one image. x: (C, H, W); y: (K, Ho*Wo) C-contiguous; rows/chans: sorted active output/input
        channels (None = all): the GEMM on the active rows and columns of the packed weight (gathered).
        compact_in: x's first S planes are the chans; compact_out: the R rows go to y's first R rows."""
        g = self.geom
        taps = g.kh * g.kw
        if chans is not None and chans.size == g.c:
            chans = None  # all channels: compact and full layouts are the same
        if rows is not None and rows.size == g.k:
            rows = None
        n_rows = g.k if rows is None else rows.size
        n_cols = (g.c if chans is None else chans.size) * taps
        if n_rows == 0:
            if not compact_out:
                y.fill(0.0)
            return
        compact_in = compact_in and chans is not None
        compact_out = compact_out and rows is not None
        if rows is not None and chans is None and self.micro.row_gemm_pays is not None and (
                self.micro.row_gemm_pays(n_cols, g.pixels) or self._wide):
            self._gated_rows_in_place(x, y, rows, compact_out)
            return
        gather_w = rows is not None or chans is not None
        build_cols = not g.is_pointwise or (chans is not None and not compact_in)
        # The backend's own GEMM, on the packed weights of all rows and columns or on the active ones gathered:
        # only in convs whose dense GEMM takes it (decided at load). Input channels only: it reads the active
        # channels' steps in place (no weight gather), at any count of them (the default model's conv5, 47 of 128
        # channels at 7x7: 95 against 111 us for gather + OpenBLAS, one-off); gathered, where the gated shape
        # still pays for the gather and packing (gathered_pays).
        in_place = self.gemm_panels is not None and n_cols > 0 and rows is None and chans is not None
        packed = in_place or (self.gemm_panels is not None and n_cols > 0 and (
            not gather_w or self._packed_gemm().gathered_pays(n_rows, n_cols, g.pixels)))
        # Wide and shallow at the active depth: the backend's row GEMM on the (gathered) weights, its tiles finishing
        # the rows (no values buffer, no epilogue pass).
        wide = not packed and n_cols > 0 and self.micro.row_gemm_wide is not None and (
            self.micro.row_gemm_wide(n_cols, g.pixels))
        if packed:
            w_size = self._packed_gemm().packed_size(n_rows, n_cols) if gather_w and not in_place else 0
        else:
            w_size = n_rows * n_cols if gather_w else 0
        w_buf, col_buf, val_buf = self.context.scratch(
            w_size, n_cols * g.pixels if build_cols else 0,
            n_rows * g.pixels if rows is not None and not compact_out and not packed and not wide else 0)
        if compact_out:
            values = y[:n_rows]
        else:
            values = y if rows is None or packed or wide else val_buf.reshape(n_rows, g.pixels)
        if n_cols == 0:
            values.fill(0.0)  # every input channel is off: the conv is its bias
        else:
            steps = None
            if in_place:
                assert chans is not None
                weight = self.gemm_panels
                steps = self._packed_gemm().channel_steps(chans, taps)
            elif packed:
                weight = self._packed_gemm().pack_gathered(self._taps(), rows, chans, w_buf, self.context) if (
                    gather_w) else self.gemm_panels
            elif gather_w:
                weight = w_buf.reshape(n_rows, n_cols)
                self.micro.gather_weights(self._taps(), rows, chans, weight, self.context)
            else:
                weight = self.packed_2d
            if compact_in and not build_cols:  # pointwise: the compact planes are the GEMM's operand as they lie
                b = np.ascontiguousarray(x).reshape(g.c, g.pixels)[:chans.size]
            elif not build_cols:
                b = x.reshape(g.c, g.pixels)
            elif g.is_pointwise:
                b = col_buf.reshape(n_cols, g.pixels)
                self.micro.gather_rows(np.ascontiguousarray(x).reshape(1, g.c, g.pixels), chans,
                                       b.reshape(1, n_cols, g.pixels), self.context)
            else:
                b = col_buf.reshape(n_cols, g.pixels)
                self.micro.im2col(x, all_indices(chans.size) if compact_in else chans, g, b, self.context)
            if packed:  # the epilogue is fused: bias + activation into the active rows, the others 0
                packed_gemm = self._packed_gemm()
                b = np.ascontiguousarray(b)
                if compact_out:
                    packed_gemm.run(weight, n_rows, b, values, None if self.bias is None else self.bias[rows],
                                    self.activation, self.context)
                    return
                if rows is not None:
                    self.micro.zero_other_rows(y, rows)
                packed_gemm.run(weight, n_rows, b, y, self.bias, self.activation, self.context, rows, steps=steps)
                return
            if wide:
                assert self.micro.row_gemm is not None
                b = np.ascontiguousarray(b)
                every = all_indices(n_rows)
                if compact_out:
                    self.micro.row_gemm(weight, every, b, values, None if self.bias is None else self.bias[rows],
                                        self.activation, self.context)
                    return
                if rows is not None:
                    self.micro.zero_other_rows(y, rows)
                self.micro.row_gemm(weight, every, b, y, self.bias, self.activation, self.context, dest=rows)
                return
            self._matmul(weight, b, values)
        if rows is None:
            self.micro.bias_activation(y[None], self.bias, self.activation, self.context)
        elif compact_out:
            self.micro.bias_activation(values[None], None if self.bias is None else self.bias[rows], self.activation,
                                       self.context)
        else:
            self.micro.scatter_bias_activation(values, rows, self.bias, self.activation, y, self.context)

    def _gated_rows_in_place(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, compact_out: bool) -> None:
        """_gated_image gated by output rows only, on the backend's row GEMM: the active rows of the plain weights
        read in place. x: (C, H, W); y: (K, Ho*Wo) C-contiguous; rows: sorted active output channels."""
        g = self.geom
        row_gemm = self.micro.row_gemm
        assert row_gemm is not None
        (flat,) = self.context.scratch(0 if g.is_pointwise else g.c * g.kh * g.kw * g.pixels)
        b = self._gemm_operand(x, flat)
        w = self._taps().reshape(g.k, -1)
        if compact_out:
            row_gemm(w, rows, b, y[:rows.size], None if self.bias is None else self.bias[rows], self.activation,
                     self.context, dest=all_indices(rows.size))
            return
        self.micro.zero_other_rows(y, rows)
        row_gemm(w, rows, b, y, self.bias, self.activation, self.context)

    def _gemm_operand(self, x: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """The dense GEMM's second operand for one image x (C, H, W): a 1x1 conv's input planes as they lie (made
        contiguous), else the im2col matrix written into ``flat`` (scratch of C*kh*kw*Ho*Wo floats)."""
        g = self.geom
        if g.is_pointwise:
            return np.ascontiguousarray(x).reshape(g.c, g.pixels)
        b = flat.reshape(-1, g.pixels)
        self.micro.im2col(x, None, g, b, self.context)
        return b

    def _winograd_image(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None,
                        chans: np.ndarray | None, compact_in: bool = False, compact_out: bool = False) -> None:
        """One image, dense or gated. x: (C, H, W); y: (K, Ho, Wo) C-contiguous; rows/chans: sorted active output/input
        channels (None = all): transform the active input channels, 16 or 36 GEMMs on the gathered active rows and
        columns of the transformed weights, transform back the active output rows (the others 0)."""
        g = self.geom
        if chans is not None and chans.size == g.c:
            chans = None
        if rows is not None and rows.size == g.k:
            rows = None
        n_rows = g.k if rows is None else rows.size
        n_cols = g.c if chans is None else chans.size
        if n_rows == 0:
            if not compact_out:
                y.fill(0.0)
            return
        compact_in = compact_in and chans is not None
        compact_out = compact_out and rows is not None
        count = winograd.tile_columns(self.tiles_h, self.tiles_w)
        slices = (self.winograd_tile + 2) ** 2
        gather = rows is not None or chans is not None
        # Input channels only, on packed slices: the packed GEMM reads the active channels' steps in place.
        in_place = rows is None and chans is not None and self.winograd_packed is not None
        # Output rows only, few tile columns: the backend's row GEMM reads the active rows of U in place.
        rows_in_place = rows is not None and chans is None and self.micro.row_gemm_pays is not None and (
            self.micro.row_gemm_pays(n_cols, count))
        gathered = gather and not (in_place or rows_in_place)  # U's active part copied into scratch
        u_buf, v_buf, m_buf = self.context.scratch(slices * n_rows * n_cols if gathered else 0,
                                                   slices * n_cols * count, slices * n_rows * count)
        m = m_buf.reshape(slices, n_rows, count)
        threads = self.context.threads
        # True: the whole conv on all threads; None: each kernel by its own size rule (PARALLEL_WINOGRAD_MACS).
        parallel = True if (self.winograd_tile == 4 and threads is not None and threads > 1
                            and m.size * n_cols >= PARALLEL_WINOGRAD_MACS) else None
        if n_cols == 0:
            m.fill(0.0)  # every input channel is off: the conv is its bias
        else:
            u = None  # the dense slices (self._winograd_u()) unless gathered below
            if gathered and rows is None:
                # Input channels only: whole rows of U^T (X, C, K), one block copy each (the element gather along
                # C ran at ~3 GB/s), then the GEMMs on the transposed view (measured ~5 % slower than on a
                # C-ordered (K, S) slice; the gather saved ~0.5 ms at 256 channels of 14x14).
                t = u_buf.reshape(slices, n_cols, n_rows)
                self.micro.gather_rows(self._winograd_u_transposed(), chans, t, self.context)
                u = t.transpose(0, 2, 1)
            elif gathered:
                u = u_buf.reshape(slices, n_rows, n_cols)
                self.micro.winograd_gather(self._winograd_u(), rows, chans, u, self.context)
            v = v_buf.reshape(slices, n_cols, count)
            self.micro.winograd_input(x, all_indices(n_cols) if compact_in else chans, g.top, g.left, self.tiles_h,
                                      self.tiles_w, v, self.context, parallel)
            if rows_in_place:
                assert rows is not None and self.micro.row_gemm is not None
                self.micro.row_gemm(self._winograd_u(), rows, v, m, None, None, self.context,
                                    dest=all_indices(n_rows), parallel=parallel)
            elif in_place:
                self._packed_gemm().run_slices(self.winograd_packed, v, m, self.context, parallel, steps=chans)
            elif not gather and self.winograd_packed is not None:
                self._packed_gemm().run_slices(self.winograd_packed, v, m, self.context, parallel)
            else:  # equal (not broadcast) batch dimensions: NumPy runs BLAS on each slice
                self._matmul(self._winograd_u() if u is None else u, v, m, parallel)
        if compact_out:
            self.micro.winograd_output(m, None, None if self.bias is None else self.bias[rows], self.activation,
                                       self.tiles_h, self.tiles_w, y[:n_rows], self.context, parallel)
        else:
            self.micro.winograd_output(m, rows, self.bias, self.activation, self.tiles_h, self.tiles_w, y,
                                       self.context, parallel)

    def _kept(self, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """Attribute ``name``, built by ``build`` on first use (two threads racing here both build the same array;
        either one is kept)."""
        value = self.__dict__.get(name)
        if value is None:
            value = build()
            setattr(self, name, value)
        return value

    def _taps(self) -> np.ndarray:
        """The weights as (K, C/groups, kh*kw). A conv that keeps only its packed weights rebuilds them on its first
        gated call."""
        g = self.geom
        return self._kept("taps", lambda: self._packed_gemm().unpack(self.gemm_panels).reshape(g.k, g.cg, g.kh * g.kw))

    def _winograd_u(self) -> np.ndarray:
        """U: float32 (X, K, C), the transformed weights; rebuilt from the packed slices on the first gated call of
        a conv that keeps only those."""
        return self._kept("winograd_u", lambda: self._packed_gemm().unpack_slices(self.winograd_packed))

    def _winograd_u_transposed(self) -> np.ndarray:
        """U^T: float32 (X, C, K), made on the first call gated by input channels only (dense and output-gated
        convs never pay its memory)."""
        return self._kept("winograd_u_t", lambda: np.ascontiguousarray(self._winograd_u().transpose(0, 2, 1)))

    def _packed_gemm(self) -> PackedGemm:
        packed_gemm = self.micro.packed_gemm
        assert packed_gemm is not None, "only convs with packed weights get here"
        return packed_gemm

    def _matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, split: bool | None = None) -> None:
        """out = a @ b (2-D, or a stack of 16 or 36 Winograd slices), split over the run's threads when large: by
        slices, else by row blocks of a/out when a has enough rows and is the larger operand, else by column
        blocks of b/out. BLAS packs the whole of the operand a chunk shares with the others, once per chunk:
        split by rows, ResNet-18's stem (a 64x147, b 147x12544) packed b four times and took as long with 2
        threads as with 1. BLAS itself runs single-threaded (see parsicore.threads). ``split``: the caller's
        choice (None: split from PARALLEL_GEMM_MACS)."""
        threads = self.context.threads
        macs = out.size * a.shape[-1]
        own_pool = self.micro.split_matmul is not None
        least = self.micro.split_min_macs() if own_pool and self.micro.split_min_macs else PARALLEL_GEMM_MACS
        if threads is None or threads <= 1 or (macs < least if split is None else not split):
            np.matmul(a, b, out=out)
            return
        by_rows = a.ndim == 2 and a.shape[0] >= GEMM_CHUNK * threads and a.size >= b.size
        if own_pool and self.micro.split_matmul(a, b, out, threads, by_rows):  # type: ignore[misc]
            return
        if a.ndim == 3:
            step = max(1, a.shape[0] // (2 * threads))
            count = -(-a.shape[0] // step)

            def task(i: int) -> None:
                s = slice(i * step, (i + 1) * step)
                np.matmul(a[s], b[s], out=out[s])
        elif by_rows:
            step = -(-a.shape[0] // (GEMM_CHUNKS_PER_THREAD * threads))
            count = -(-a.shape[0] // step)

            def task(i: int) -> None:
                s = slice(i * step, (i + 1) * step)
                np.matmul(a[s], b, out=out[s])
        else:
            step = -(-b.shape[1] // (GEMM_CHUNKS_PER_THREAD * threads))
            count = -(-b.shape[1] // step)

            def task(i: int) -> None:
                s = slice(i * step, (i + 1) * step)
                np.matmul(a, b[:, s], out=out[:, s])
        run_chunks(task, count, threads)

    def _gated_grouped_image(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None,
                             chans: np.ndarray | None) -> None:
        """groups > 1 (not depthwise), one image. x: (1, C, H, W); y: (K, Ho, Wo); per group, the active rows and
        columns of that group's GEMM. Rare in practice: plain NumPy, small temporaries."""
        g = self.geom
        out = y.reshape(g.k, g.pixels)
        out.fill(0.0)
        for group in range(g.groups):
            k0, c0 = group * g.kg, group * g.cg
            rows_g = np.arange(k0, k0 + g.kg) if rows is None else _within(rows, k0, k0 + g.kg)
            if rows_g.size == 0:
                continue
            chans_g = np.arange(c0, c0 + g.cg) if chans is None else _within(chans, c0, c0 + g.cg)
            values = np.zeros((1, rows_g.size, g.pixels), dtype=np.float32)
            if chans_g.size:
                weight = self.taps[np.ix_(rows_g, chans_g - c0)].reshape(rows_g.size, -1)
                cols = np.empty((chans_g.size * g.kh * g.kw, g.pixels), dtype=np.float32)
                im2col(x[0], chans_g, g, cols)
                np.matmul(weight, cols, out=values[0])
            bias_activation(values, None if self.bias is None else self.bias[rows_g], self.activation)
            out[rows_g] = values[0]

    def _depthwise_compact(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None, chans: np.ndarray | None,
                           compact_in: bool) -> None:
        """One image, depthwise, compact output (and input). x: (1, C, H, W); y: (1, K, Ho, Wo) C-contiguous; rows:
        the active channels (None = all), written to y's first R planes: a dense depthwise conv of R channels on
        their input planes (the compact input's first R planes, which must be the same channels, else gathered
        from the full input, whose inactive channels are zero: those planes come out as act(bias))."""
        g = self.geom
        if compact_in and not (rows is chans or (rows is not None and chans is not None
                                                and np.array_equal(rows, chans))):
            raise ValueError("a depthwise conv reads a compact input only into a compact output of the same channels")
        if rows is None or rows.size == g.c:
            self.micro.depthwise(x, self.filters, self.bias, self.activation, None, g, y, self.context)
            return
        r = rows.size
        if r == 0:
            return
        sub = self._depthwise_sub.get(r)
        if sub is None:  # dataclasses.replace costs ~4 us a call: one geometry per active count, kept
            sub = self._depthwise_sub[r] = replace(g, c=r, k=r, groups=r)
        planes = x[:, :r] if compact_in else x[:, rows]
        self.micro.depthwise(planes, self.filters, self.bias, self.activation, None, sub, y[:, :r], self.context,
                             channels=rows)

    def _depthwise_modes(self, n: int, rows: list[np.ndarray] | None, chans: list[np.ndarray] | None) -> np.ndarray:
        """int8 (N, C): MODE_ZERO for inactive outputs, else MODE_BIAS for inactive inputs, else MODE_COMPUTE."""
        c = self.geom.c
        modes = np.full((n, c), MODE_COMPUTE if chans is None else MODE_BIAS, dtype=np.int8)
        for i in range(n):
            if chans is not None:
                modes[i, chans[i]] = MODE_COMPUTE
            if rows is not None:
                kept = modes[i, rows[i]]
                modes[i] = MODE_ZERO
                modes[i, rows[i]] = kept
        return modes


def _row_blocks(g: ConvGeometry) -> list[tuple[int, int, int, int, ConvGeometry]]:
    """The output row blocks of a blocked im2col conv: per block (first input row read, last + 1, first output
    column, last + 1, the geometry of the block alone: its input rows, its output rows, its share of padding)."""
    rows = max(1, BLOCK_COLUMNS // (g.c * g.kh * g.kw * g.wo))
    reach = (g.kh - 1) * g.dil_h + 1
    blocks = []
    for oh0 in range(0, g.ho, rows):
        oh1 = min(g.ho, oh0 + rows)
        first, last = oh0 * g.stride_h - g.top, (oh1 - 1) * g.stride_h - g.top + reach  # padded rows read
        r0, r1 = min(max(first, 0), g.h), max(min(last, g.h), 0)
        r1 = max(r1, r0)
        sub = replace(g, h=r1 - r0, ho=oh1 - oh0, top=r0 - first, bottom=last - r1)
        blocks.append((r0, r1, oh0 * g.wo, oh1 * g.wo, sub))
    return blocks


def _within(sorted_channels: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The entries of a sorted index array in [lo, hi)."""
    start, stop = np.searchsorted(sorted_channels, (lo, hi))
    return sorted_channels[start:stop]


def make_conv(spec: KernelSpec) -> ConvKernel:
    """Factory: pack the weights of a Conv for the NumPy backend."""
    return ConvKernel(spec, NUMPY_MICROKERNELS)


FACTORIES = {"Conv": make_conv}

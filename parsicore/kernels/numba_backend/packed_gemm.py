"""A GEMM on weights packed once at load, with the conv epilogue fused: parsicore's own, beside BLAS.

NumPy's BLAS packs both operands on every call. For a conv the weight operand never changes, and at the
skinny shapes of late CNN layers packing it is much of the call: ResNet-18's layer-4 GEMM (512x4608 weights
by a 4608x49 im2col matrix) took 2.0-2.4 ms in OpenBLAS (SkylakeX kernels), of which ~1.5 ms is fixed cost
whatever N is. Here the weights are packed once (:func:`pack`, :class:`PackedWeights`) into panels of ``MR``
output rows, in the order the GEMM reads them, so each step of the inner loop reads MR consecutive floats and
the whole matrix is one stream (prefetched ``PREFETCH_STEPS`` ahead: a model's late-layer weights are not in
cache when their conv runs).

Microkernel: an MR x NR tile of the output is held in NR * vectors LLVM vector registers of ``lanes``
floats (the vectors run along output rows). Each of the K steps loads MR packed weights, broadcasts NR
values of the im2col row, and does NR * vectors fused multiply-adds. Numba has no SIMD types, and its loops
over a local accumulator array stay scalar (measured: ~10 GFLOP/s), so the microkernel is an ``@intrinsic``
that writes the loop in LLVM IR with vector types; LLVM lowers them on every target (a <16 x float> is one
AVX-512 register, two AVX2 ones, four NEON ones), so the tile shape is chosen per vector width
(:func:`micro_shape`). One intrinsic holds a loop per column width (:func:`column_widths`: NR, then powers of
two below it), so N columns are cut into exact blocks and no read passes the end of the operand.

Blocking (Goto's loop order, without packing the second operand): K in blocks of ``DEPTH`` steps, so the
im2col block a microkernel reads (DEPTH x NR floats) stays in L1 while every panel runs over it; output
columns in groups whose tiles (the accumulators between K blocks) fit in ``TILE_BYTES``. Tiles are written
to the output through the epilogue (bias + activation), transposed (the vectors run along output rows, the
output is row-major).

Figures: ``python scripts/bench_kernels.py --only packed_gemm`` (1 thread, against OpenBLAS).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import NamedTuple

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from parsicore.kernels.base import Activation, KernelContext
from parsicore.kernels.numba_backend.epilogue import activation_params, all_indices, finish_span, zeros
from parsicore.kernels.numba_backend.parallel import chunk_bounds, jit, jit_inline, serial_and_parallel, splits_gemm


class MicroShape(NamedTuple):
    """The microkernel's tile: ``vectors`` vectors of ``lanes`` float32 per output column (MR = lanes *
    vectors output rows) by ``columns`` output columns (NR); NR * vectors accumulator registers."""

    lanes: int
    vectors: int
    columns: int

    @property
    def rows(self) -> int:
        return self.lanes * self.vectors


def micro_shape(features: dict[str, bool], machine: str) -> MicroShape | None:
    """The tile for a CPU (``features``: LLVM's host feature flags; ``machine``: platform.machine()), or None
    where there is no vector FMA to build it on (BLAS stays the only GEMM).

    - AVX-512 (32 registers of 16 floats): 16 x 25, 25 accumulators + 1 weight vector + 1 broadcast.
      On ResNet-18's 512x4608x49 GEMM (1 thread, a one-off sweep on a prototype): 16 x 25 1.25-1.34 ms,
      16 x 28 1.39-1.52, 32 x 14 1.51-1.62, 32 x 7 1.91, 64 x 6 2.37; OpenBLAS 1.9-2.1.
    - AVX2 + FMA (16 registers of 8 floats): 16 x 6, 12 accumulators (the shape of OpenBLAS's Haswell sgemm).
    - AArch64 NEON (32 registers of 4 floats): 8 x 12, 24 accumulators (the shape of the ARMv8 sgemm kernels
      of OpenBLAS and ncnn). Not timed on a board yet: see :func:`enabled_on`.
    """
    if features.get("avx512f"):
        return MicroShape(16, 1, 25)
    if features.get("avx2") and features.get("fma"):
        return MicroShape(8, 2, 6)
    if machine.lower() in ("aarch64", "arm64"):
        return MicroShape(4, 2, 12)
    return None


def target_features(cpu_name: str | None, cpu_features: str | None, host: dict[str, bool]) -> dict[str, bool]:
    """The CPU features Numba compiles for (``cpu_name``/``cpu_features``: NUMBA_CPU_NAME/NUMBA_CPU_FEATURES as
    numba.config holds them; ``host``: LLVM's host features). The host's unless NUMBA_CPU_NAME names another CPU
    (a cache portable to older machines); then only the features NUMBA_CPU_FEATURES spells out ("+avx2,+fma"),
    since a named CPU's own are not known here: a tile for vectors the target lacks would still be correct,
    but spill."""
    if cpu_name is None or cpu_name == "host":
        return dict(host)
    flags = [f.strip() for f in (cpu_features or "").split(",")]
    return {f[1:]: f[0] == "+" for f in flags if len(f) > 1 and f[0] in "+-"}


#: This machine's tile (None: no packed GEMM here). Fixed at import, like every constant the kernels compile in.
MICRO = micro_shape(target_features(numba.config.CPU_NAME, numba.config.CPU_FEATURES,
                                    dict(llvm.get_host_cpu_features())), platform.machine())

def enabled_on(shape: MicroShape | None) -> bool:
    """Whether convs take the packed GEMM at all with this tile: on the vector widths where it was measured faster
    than OpenBLAS, AVX-512 (16 lanes) and AVX2 (8 lanes; a Zen 4 VM with AVX-512 hidden, against OpenBLAS's own
    choice of kernels, 1 thread, ``python scripts/bench_kernels.py --only packed_gemm``: 512x4608x49 0.89 hot and
    0.88 cold, 512x2304x49 0.85, 256x2304x16 0.78, 256x2304x196 0.96, the shallower rows 0.97-1.02). NEON: built
    and tested (the tests turn it on), BLAS stays the GEMM until a board measures it."""
    return shape is not None and shape.lanes in (8, 16)


def gathers_on(shape: MicroShape | None) -> bool:
    """Whether gated convs also gather and pack their active weights on each call for it (:func:`gathered_pays`):
    on AVX-512 only. On the AVX2 VM above gather-pack + packed GEMM took 1.06-1.15x gather + OpenBLAS at every
    gated row of the benchmark (ResNet-18-gated50 1.033 then 0.993 against BLAS alternated, with and without it)."""
    return shape is not None and shape.lanes == 16


#: Whether convs take the packed GEMM (dense calls, and gated ones reading the active steps in place) here.
ENABLED = enabled_on(MICRO)
#: Whether gated calls also take it on weights gathered and packed per call.
GATHERED = gathers_on(MICRO)

#: The shapes where it beats OpenBLAS (SkylakeX kernels, 1 thread; ``python scripts/bench_kernels.py --only
#: packed_gemm`` has a row per kind): a deep product (K >= MIN_DEPTH), which pays for the microkernel's tile
#: loads and the transposing epilogue, and few columns: N <= MAX_COLUMNS with enough weights (M*K >=
#: MIN_WEIGHTS), or N <= MAX_COLUMNS_DEEP with K >= MIN_DEPTH_WIDE and M >= MIN_ROWS_WIDE (where BLAS's
#: per-call packing of the weights is most of its time). Dense, against np.matmul (one-off sweeps of M x K by
#: N): 256x2304 at N = 16, 25, 36, 49, 64, 100, 196: 0.53, 0.48, 0.62, 0.66, 0.92, 0.81, 0.87; 512x256 at 49,
#: 64, 100, 196: 0.77, 1.03, 0.94, 1.04; 32x288 at 49: 1.00, at 64: 1.44; N >= 784 1.2-1.4. Winograd slices,
#: 16 x 256x256 by 56: 0.88, 36 x 128x128 by 56: 1.14. Shallow products at N = 49: 960x160 0.81, 512x128 0.83,
#: 256x128 0.86, 128x128 1.12; at N = 16: 512x128 0.82, 256x192 1.04, 128x192 1.24; at N = 196, K < 384 loses
#: (960x160 1.15, 256x128 1.10). Gated
#: (pack_gathered + this against gather_weights + np.matmul, N = 49): 128x576 0.95-0.98, 64x1152 0.89-0.90,
#: 64x576 0.98-1.08, 128x288 1.09, 32x288 1.31-1.35. Twelfth session, K = 384 and 576 (MobileNetV2's 14x14
#: projects; bias epilogue included, best of 3 x 5 x 20 calls, 1 thread, /tmp one-off sweep): at N = 196 24x384
#: 1.06, 32x384 0.77, 48x384 0.92, 64x384 0.90, 96x384 0.94, 128x384 0.92, 160x384 0.95, 256x384 0.95, 64x576
#: 0.86; 64x384 at N = 100 0.82, at 64 0.92; 32x576 at 144 0.76.
MAX_COLUMNS = 64
MAX_COLUMNS_DEEP = 200
MIN_DEPTH = 128
MIN_DEPTH_WIDE = 384
MIN_ROWS_WIDE = 32
MIN_WEIGHTS = 1 << 16

#: K steps per block: the NR-column im2col block a microkernel reads is DEPTH x NR floats (19 KB at NR 25),
#: kept in L1 across the panels. At 512x4608x49, hot (a one-off check on a prototype of the microkernel): 128
#: 1.33-1.42 ms, 192 1.25-1.34, 256 1.57, 512 1.43-1.53, unblocked 1.56-1.60.
DEPTH = 192

#: The microkernel prefetches the packed weights this many steps ahead (0: not at all). Read in the order they
#: are packed, they are one stream, so a fixed distance always fetches what comes next. 512x4608x49 cycling
#: through 8 weight matrices (cold; one-off checks, the constant edited between runs): none 2.56 ms, 8 steps
#: 2.09, 16 1.94, 32 1.80-1.86, 64 1.86, 128 1.89 (OpenBLAS 2.8). Panel-major packing (each panel's K steps
#: contiguous) without prefetch took the same 2.56 ms cold as K-block-major: the prefetch is what helps.
PREFETCH_STEPS = 32

#: Bytes of accumulator tiles kept between K blocks per thread (a group of output columns at a time).
TILE_BYTES = 1 << 18


def column_widths(shape: MicroShape) -> tuple[int, ...]:
    """The microkernel's column counts, widest first: NR, the multiples of 4 below it, then 2 and 1 (AVX-512: 25,
    24, 20, 16, 12, 8, 4, 2, 1). :func:`column_blocks` cuts a GEMM's N columns into blocks of these widths, so
    no block computes padding and the blocks are about equally wide."""
    widths = [shape.columns] + [w for w in range(shape.columns - 1, 2, -1) if w % 4 == 0] + [2, 1]
    return tuple(w for i, w in enumerate(widths) if w <= shape.columns and w not in widths[:i])


class StepLoop(NamedTuple):
    """A microkernel's K loop in LLVM IR, opened by :func:`step_loop`: the builder is inside its body."""

    step: ir.PHINode  #: the step, i64 from 0
    tile: list  #: the accumulators' phi nodes, one per vector register
    body: ir.Block
    done: ir.Block

    def close(self, builder: ir.IRBuilder, updated: list, depth_v: ir.Value) -> None:
        """End the body (``updated``: the accumulators after this step) looping while step + 1 < depth_v (the
        loop runs at least once); the builder is then after the loop, where ``updated`` hold the sums."""
        following = builder.add(self.step, ir.Constant(ir.IntType(64), 1))
        self.step.add_incoming(following, self.body)
        for phi, value in zip(self.tile, updated, strict=True):
            phi.add_incoming(value, self.body)
        builder.cbranch(builder.icmp_signed("<", following, depth_v), self.body, self.done)
        builder.position_at_end(self.done)


def outer_update(builder: ir.IRBuilder, scalars: list, vectors: list, tile: list) -> list:
    """One step's rank-1 update in LLVM IR: tile[i * V + v] + broadcast(scalars[i]) * vectors[v] (fused), V =
    len(vectors), for every i and v: the new accumulators in that order."""
    vec = vectors[0].type
    i32 = ir.IntType(32)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                         f"llvm.fma.v{vec.count}f32")
    undef = ir.Constant(vec, ir.Undefined)
    splat = ir.Constant(ir.VectorType(i32, vec.count), [0] * vec.count)
    updated = []
    for i, value in enumerate(scalars):
        broadcast = builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef, splat)
        for v, operand in enumerate(vectors):
            updated.append(builder.call(fma, [operand, broadcast, tile[i * len(vectors) + v]]))
    return updated


def step_loop(builder: ir.IRBuilder, name: str, start: list) -> StepLoop:
    """Open a K loop over accumulator vectors that start at ``start`` (values in the builder's current block)."""
    entry = builder.block
    body = builder.append_basic_block(f"{name}_loop")
    done = builder.append_basic_block(f"{name}_done")
    builder.branch(body)
    builder.position_at_end(body)
    step = builder.phi(ir.IntType(64))
    step.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
    tile = []
    for value in start:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        tile.append(phi)
    return StepLoop(step, tile, body, done)


def _emit_tile(context, builder, shape: MicroShape, columns: int, prefetch: int, ptrs, ldb_v, depth_v, acc_v,
               idx_ptr=None):
    """LLVM IR for one MR x ``columns`` tile (see _make_microkernel), at the builder's position. ``idx_ptr``: an
    i64* of weight steps (the indexed microkernel), else the steps are 0, 1, 2, ..."""
    lanes, vectors = shape.lanes, shape.vectors
    rows = shape.rows
    a_ptr, b_ptr, c_ptr = ptrs
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, lanes)
    i64 = ir.IntType(64)
    i32 = ir.IntType(32)
    zero = ir.Constant(vec, [0.0] * lanes)

    def c_slot(j, v):
        return builder.bitcast(builder.gep(c_ptr, [ir.Constant(i64, j * rows + v * lanes)]), vec.as_pointer())

    start = [builder.select(acc_v, builder.load(c_slot(j, v), align=4), zero)
             for j in range(columns) for v in range(vectors)]
    loop = step_loop(builder, f"packed_gemm{columns}", start)
    step, tile = loop.step, loop.tile
    if idx_ptr is None:
        a_row = builder.gep(a_ptr, [builder.mul(step, ir.Constant(i64, rows))])
    else:  # the table holds (step, prefetch target) pairs
        pair = builder.mul(step, ir.Constant(i64, 2))
        a_row = builder.gep(a_ptr, [builder.mul(builder.load(builder.gep(idx_ptr, [pair])), ir.Constant(i64, rows))])
    weights = [builder.load(builder.bitcast(builder.gep(a_row, [ir.Constant(i64, v * lanes)]), vec.as_pointer()),
                            align=4) for v in range(vectors)]
    if prefetch:
        i8p = ir.IntType(8).as_pointer()
        hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                              "llvm.prefetch.p0i8")
        if idx_ptr is None:  # past the last step it prefetches beyond the array: a hint, it never faults
            ahead = builder.bitcast(builder.gep(a_row, [ir.Constant(i64, prefetch * rows)]), i8p)
        else:  # the step's own prefetch target (past this panel's steps: the next panel's, see step_selection)
            later = builder.load(builder.gep(idx_ptr, [builder.add(pair, ir.Constant(i64, 1))]))
            ahead = builder.bitcast(builder.gep(a_ptr, [builder.mul(later, ir.Constant(i64, rows))]), i8p)
        builder.call(hint, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    b_row = builder.gep(b_ptr, [builder.mul(step, ldb_v)])
    scalars = [builder.load(builder.gep(b_row, [ir.Constant(i64, j)]), align=4) for j in range(columns)]
    updated = outer_update(builder, scalars, weights, tile)
    loop.close(builder, updated, depth_v)
    for j in range(columns):
        for v in range(vectors):
            builder.store(updated[j * vectors + v], c_slot(j, v), align=4)


def _make_microkernel(shape: MicroShape, prefetch: int, indexed: bool = False):
    """An intrinsic ``micro(width, a, a_off, b, b_off, ldb, c, c_off, depth, accumulate)``: the MR x ``width``
    tile at c[c_off:] (``width`` columns of MR floats) = (accumulate ? tile : 0) + sum over ``depth`` (>= 1)
    steps t of a[a_off + t*MR : +MR] (outer) b[b_off + t*ldb : +width]. ``width`` is one of column_widths(shape)
    (another does nothing); a, b, c: float32 1-D C-contiguous arrays; offsets in elements; no bounds checks
    (the caller's loops keep every access inside its array). The packed weights are prefetched ``prefetch``
    steps ahead.

    ``indexed``: ``micro(width, a, a_off, idx, idx_off, b, ...)``, idx int64 1-D of (step, prefetch target) pairs,
    step t reading a[a_off + idx[idx_off + 2t]*MR : +MR] and prefetching a[a_off + idx[idx_off + 2t + 1]*MR]: the
    weight steps of the active input channels, read in place from the dense packed weights."""
    widths = column_widths(shape)

    def body(context, builder, signature, args, a_at, b_at, c_at, idx_ptr):
        width_v, a_off_v, b_off_v, ldb_v, c_off_v, depth_v, acc_v = (args[i] for i in (0, 2, b_at + 1, b_at + 2,
                                                                                       c_at + 1, c_at + 2, c_at + 3))
        ptrs = (builder.gep(context.make_array(signature.args[a_at])(context, builder, args[a_at]).data, [a_off_v]),
                builder.gep(context.make_array(signature.args[b_at])(context, builder, args[b_at]).data, [b_off_v]),
                builder.gep(context.make_array(signature.args[c_at])(context, builder, args[c_at]).data, [c_off_v]))
        merge = builder.append_basic_block("packed_gemm_merge")
        switch = builder.switch(width_v, merge)
        for columns in widths:
            case = builder.append_basic_block(f"packed_gemm_width{columns}")
            switch.add_case(ir.Constant(ir.IntType(64), columns), case)
            builder.position_at_end(case)
            _emit_tile(context, builder, shape, columns, prefetch, ptrs, ldb_v, depth_v, acc_v, idx_ptr)
            builder.branch(merge)
        builder.position_at_end(merge)
        return context.get_dummy_value()

    if not indexed:
        @intrinsic
        def micro(typingctx, width, a, a_off, b, b_off, ldb, c, c_off, depth, accumulate):
            sig = types.void(types.intp, a, types.intp, b, types.intp, types.intp, c, types.intp, types.intp,
                             types.boolean)

            def codegen(context, builder, signature, args):
                return body(context, builder, signature, args, 1, 3, 6, None)

            return sig, codegen

        return micro

    @intrinsic
    def micro_indexed(typingctx, width, a, a_off, idx, idx_off, b, b_off, ldb, c, c_off, depth, accumulate):
        sig = types.void(types.intp, a, types.intp, idx, types.intp, b, types.intp, types.intp, c, types.intp,
                         types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            idx_ptr = builder.gep(context.make_array(signature.args[3])(context, builder, args[3]).data, [args[4]])
            return body(context, builder, signature, args, 1, 5, 8, idx_ptr)

        return sig, codegen

    return micro_indexed


if MICRO is not None:
    _micro = _make_microkernel(MICRO, PREFETCH_STEPS)
    _micro_indexed = _make_microkernel(MICRO, PREFETCH_STEPS, indexed=True)
    _ROWS = MICRO.rows
    _WIDTHS = np.array(column_widths(MICRO), dtype=np.int64)
else:  # never called: packed_gemm refuses before reaching a kernel
    _micro = _micro_indexed = None
    _ROWS = 1
    _WIDTHS = np.ones(1, dtype=np.int64)


#: The (unused) step table of a call that reads every step.
_NO_STEPS = np.zeros(1, dtype=np.int64)


def available() -> bool:
    """Whether this machine has a packed GEMM (a vector FMA to build the microkernel on)."""
    return MICRO is not None


def _require_micro() -> None:
    if MICRO is None:
        raise RuntimeError("no packed GEMM on this machine (packed_gemm.available() is False)")


def pays(rows: int, depth: int, columns: int) -> bool:
    """Whether an M x K by K x N GEMM (``rows``, ``depth``, ``columns``) takes the packed GEMM here."""
    return ENABLED and depth >= MIN_DEPTH and (
        (columns <= MAX_COLUMNS and rows * depth >= MIN_WEIGHTS)
        or (columns <= MAX_COLUMNS_DEEP and depth >= MIN_DEPTH_WIDE and rows >= MIN_ROWS_WIDE))


def gathered_pays(rows: int, depth: int, columns: int) -> bool:
    """Whether a gated GEMM on the active weights gathered and packed per call takes the packed GEMM here (else
    they are gathered for BLAS)."""
    return GATHERED and pays(rows, depth, columns)


def panel_count(rows: int) -> int:
    """Panels of MR rows that hold ``rows`` weight rows."""
    return -(-rows // _ROWS)


def packed_size(rows: int, depth: int) -> int:
    """Elements of the packed weights of ``rows`` rows of ``depth`` (pack_gathered's scratch)."""
    return panel_count(rows) * depth * _ROWS


@dataclass(frozen=True)
class PackedWeights:
    """An M x K weight matrix packed for the microkernel, in the order the GEMM reads it: K in blocks of
    ``block`` steps; within a block, panel by panel (MR rows, the rows past M zero); within a panel, step by
    step, MR floats each. So the GEMM's first pass over each K block reads the weights front to back, one stream
    that a fixed-distance prefetch keeps ahead of (PREFETCH_STEPS): cold weights (a model's late layers, 9.4
    MB each, are not in cache when their conv runs) then cost 1.8 ms against 1.6 hot; without the prefetch,
    2.6 ms in either order, as long as OpenBLAS.

    data: float32 (panel_count(rows) * depth * MR,); element (row r, step t) of block b = t // block lies at
    b*block*P*MR + (r // MR)*steps_b*MR + (t - b*block)*MR + r % MR, steps_b = min(block, depth - b*block)."""

    data: np.ndarray
    rows: int
    depth: int
    block: int


def pack(a: np.ndarray, block: int | None = None) -> PackedWeights:
    """a: float32 (M, K) -> its PackedWeights (K blocks of ``block`` steps, default DEPTH)."""
    _require_micro()
    block = DEPTH if block is None else block
    m, k = a.shape
    panels = panel_count(m)
    padded = np.zeros((panels * _ROWS, k), dtype=np.float32)
    padded[:m] = a
    data = np.empty(panels * k * _ROWS, dtype=np.float32)
    for k0 in range(0, k, block):
        k1 = min(k, k0 + block)
        part = padded[:, k0:k1].reshape(panels, _ROWS, k1 - k0).transpose(0, 2, 1)
        data[k0 * panels * _ROWS:k1 * panels * _ROWS] = part.reshape(-1)
    return PackedWeights(data, m, k, block)


def unpack(packed: PackedWeights) -> np.ndarray:
    """The float32 (M, K) matrix that :func:`pack` packed (packed.data 1-D): the inverse of pack."""
    m, k, block = packed.rows, packed.depth, packed.block
    panels = panel_count(m)
    out = np.empty((panels * _ROWS, k), dtype=np.float32)
    for k0 in range(0, k, block):
        k1 = min(k, k0 + block)
        part = packed.data[k0 * panels * _ROWS:k1 * panels * _ROWS].reshape(panels, k1 - k0, _ROWS)
        out[:, k0:k1] = part.transpose(0, 2, 1).reshape(panels * _ROWS, k1 - k0)
    return np.ascontiguousarray(out[:m])


def unpack_slices(packed: PackedWeights) -> np.ndarray:
    """The float32 (X, M, K) stack that :func:`pack_slices` packed: its inverse."""
    return np.stack([unpack(PackedWeights(row, packed.rows, packed.depth, packed.block)) for row in packed.data])


def pack_slices(u: np.ndarray) -> PackedWeights:
    """u: float32 (X, M, K), a stack of weight matrices (Winograd's transformed weights) -> PackedWeights whose
    data is (X, panel_count(M) * K * MR), each row one slice packed as pack() does."""
    data = np.stack([pack(u[x]).data for x in range(u.shape[0])])
    return PackedWeights(data, u.shape[1], u.shape[2], DEPTH)


@serial_and_parallel
def _pack_gathered_kernel(taps, rows, channels, block, out):
    """taps: float32 (K, C, T); rows: int64 (R,); channels: int64 (S,) -> out: float32 (P*S*T*MR,), the
    PackedWeights layout (K blocks of ``block``) of taps[rows][:, channels] flattened to (R, S*T), lanes past
    R zero. One task per panel, written in order: each step reads one value from each of the panel's MR weight
    rows (MR short read streams). One task per lane instead (unit-stride reads, writes of stride MR over the
    whole output) took ~3x longer on ResNet-18's gated layer-4 weights, the output not staying in L2."""
    _, c, n_taps = taps.shape
    n_rows = rows.shape[0]
    n_sel = channels.shape[0]
    mr = _ROWS
    panels = (n_rows + mr - 1) // mr
    u = np.uint64
    steps = u(n_sel) * u(n_taps)
    tf = taps.reshape(-1)
    umr = u(mr)
    up = u(panels)
    ublock = u(block)
    ut = u(n_taps)
    for p in numba.prange(panels):
        lanes = min(mr, n_rows - p * mr)
        starts = np.empty(mr, dtype=np.uint64)
        for i in range(lanes):
            starts[i] = u(rows[p * mr + i]) * u(c) * ut
        step = u(0)
        for s in range(n_sel):
            offset = u(channels[s]) * ut
            for t in range(ut):
                b0 = (step // ublock) * ublock
                width = min(ublock, steps - b0)
                dst = b0 * up * umr + u(p) * width * umr + (step - b0) * umr
                for i in range(lanes):
                    out[dst + u(i)] = tf[starts[i] + offset + t]
                for i in range(lanes, mr):
                    out[dst + u(i)] = 0.0
                step += u(1)


def pack_gathered(taps: np.ndarray, rows: np.ndarray | None, channels: np.ndarray | None, out: np.ndarray,
                  context: KernelContext | None = None) -> PackedWeights:
    """The packed weights of a gated conv's GEMM, gathered: taps float32 (K, C, T) C-contiguous; rows: int64
    (R,) or None (all K); channels: int64 (S,) or None (all C); out: float32 flat scratch of at least
    packed_size(R, S*T) elements, which the result's data is a view of. Equal to pack(taps[rows][:, channels]
    flattened to (R, S*T))."""
    _require_micro()
    k, c, n_taps = taps.shape
    rows = all_indices(k) if rows is None else np.asarray(rows, dtype=np.int64)
    channels = all_indices(c) if channels is None else np.asarray(channels, dtype=np.int64)
    depth = channels.shape[0] * n_taps
    data = out[:packed_size(rows.shape[0], depth)]
    threads = None if context is None else context.threads
    _pack_gathered_kernel(threads, data.size, np.ascontiguousarray(taps, dtype=np.float32), rows, channels, DEPTH,
                          data)
    return PackedWeights(data, rows.shape[0], depth, DEPTH)


@jit
def _column_blocks(n, widths):
    """N columns cut into blocks of the microkernel's widths (widths: int64, widest first, ending in 1): as many
    blocks as N / NR needs, each of the narrowest width at least N / blocks, then the rest greedily from the
    widest. int64 (B, 2) of (first column, width). N = 49 at NR 25: 25 + 24; 56: 20 + 20 + 16; 64: 24 + 24 + 16.
    Cutting greedily from NR left narrow blocks (56: 25 + 25 + 4 + 2), each almost as slow as a wide one: it
    re-reads the weights for a few columns (16 slices of 256x256 by 56 columns: 1.01x OpenBLAS's time against
    0.81x at 49 = 25 + 16 + 8)."""
    blocks = np.empty((n + 1, 2), dtype=np.int64)
    count = 0
    start = 0
    if n > 0:
        wanted = -(-n // -(-n // widths[0]))  # ceil(n / ceil(n / NR))
        even = widths[0]
        for w in widths:
            if w >= wanted:
                even = w
        while n - start >= even:
            blocks[count, 0] = start
            blocks[count, 1] = even
            start += even
            count += 1
    for w in widths:
        while n - start >= w:
            blocks[count, 0] = start
            blocks[count, 1] = w
            start += w
            count += 1
    return blocks[:count]


@functools.lru_cache(maxsize=256)
def _dense_starts(depth: int, block: int) -> np.ndarray:
    """The K blocks of a call reading every step, as _gemm_panels takes them: int64 (B + 1,), block b's steps
    [starts[b], starts[b + 1]). Cached and shared (like all_indices): never modified."""
    return np.minimum(np.arange(-(-depth // block) + 1, dtype=np.int64) * block, depth)


@jit_inline
def _gemm_panels(packed, a0, m, block, depth, starts, local, indexed, bf, n, blocks, bias, has_bias, code, alpha,
                 beta, lo, hi, dest, p0, p1, cap, tiles, line, of, o0):
    """Panels [p0, p1) of one GEMM (see _gemm_kernel): the packed M x ``depth`` matrix at packed[a0:] (K blocks of
    ``block``), b flat (bf, K' x N), out flat from of[o0:] (row stride N). Block b of the packed weights meets b's
    rows [starts[b], starts[b + 1]): all its steps in order (dense: K' = depth), or with ``indexed`` the steps
    local[2 * starts[b]:2 * starts[b + 1]:2] of it (the active input channels' steps, relative to the block's start;
    b's rows are those steps' im2col rows; step_selection's pairs). ``tiles`` and ``line``: scratch of (p1 - p0) *
    (cap + NR) * MR and (cap + NR) * MR floats; ``blocks`` from _column_blocks; ``cap``: columns per group of
    tiles."""
    mr = _ROWS
    panels = (m + mr - 1) // mr
    n_blocks = blocks.shape[0]
    k_blocks = starts.shape[0] - 1
    g0 = 0
    while g0 < n_blocks:
        c0 = blocks[g0, 0]
        g1 = g0 + 1
        while g1 < n_blocks and blocks[g1, 0] + blocks[g1, 1] - c0 <= cap:
            g1 += 1
        span = blocks[g1 - 1, 0] + blocks[g1 - 1, 1] - c0
        for kb in range(k_blocks):
            s0 = starts[kb]
            steps = starts[kb + 1] - s0
            if steps == 0:
                continue
            width = min(block, depth - kb * block)
            for jb in range(g0, g1):
                j0 = blocks[jb, 0]
                for p in range(p0, p1):
                    a_off = a0 + (kb * block * panels + p * width) * mr
                    c_off = ((p - p0) * span + j0 - c0) * mr
                    if indexed:
                        _micro_indexed(blocks[jb, 1], packed, a_off, local, 2 * s0, bf, s0 * n + j0, n, tiles, c_off,
                                       steps, s0 > 0)
                    else:
                        _micro(blocks[jb, 1], packed, a_off, bf, s0 * n + j0, n, tiles, c_off, steps, s0 > 0)
        for p in range(p0, p1):
            rows = min(mr, m - p * mr)
            base = (p - p0) * span * mr
            # Transposed into row order first (reads unit-stride), then each row through the vectorised epilogue:
            # element by element through activate_value, strided, the epilogue took ~1.5 ns per output.
            for j in range(span):
                for i in range(mr):
                    line[i * span + j] = tiles[base + j * mr + i]
            for i in range(rows):
                row = dest[p * mr + i]
                bv = bias[row] if has_bias else np.float32(0.0)
                finish_span(line, np.uint64(i * span), of, np.uint64(o0 + row * n + c0), span, bv, code, alpha, beta,
                            lo, hi)
        g0 = g1


@serial_and_parallel
def _gemm_kernel(packed, m, block, depth, starts, local, indexed, b, bias, has_bias, code, alpha, beta, lo, hi, dest,
                 widths, chunks, tile_bytes, out):
    """packed: float32 (P*depth*MR,) (PackedWeights.data, K blocks of ``block``); starts, local, indexed: which of
    its steps meet which rows of b (see _gemm_panels); b: float32 (K', N) C-contiguous; dest: int64 (m,) rows of
    out; widths: int64, the microkernel's column widths (column_widths); out: float32 (R, N) C-contiguous:
    out[dest[i]] = act(row i of the packed matrix (its selected steps) @ b + bias[dest[i]]), other rows untouched.

    Panels split into ``chunks`` (one per thread); each chunk runs groups of column blocks (whose tiles fit in
    ``tile_bytes``), then K blocks, then column blocks, then its panels, and finishes each group's tiles through
    the epilogue. The microkernels read b in place (row stride N). (Copying b into contiguous column blocks
    first made every measured shape slower: 1.02-1.8x.)"""
    n = b.shape[1]
    mr = _ROWS
    panels = (m + mr - 1) // mr
    blocks = _column_blocks(n, widths)
    of = out.reshape(-1)
    bf = b.reshape(-1)
    for chunk in numba.prange(chunks):
        p0, p1 = chunk_bounds(chunk, chunks, panels)
        cap = max(widths[0], tile_bytes // (4 * mr * max(1, p1 - p0)))
        tiles = np.empty((p1 - p0) * min(cap + widths[0], n) * mr, dtype=np.float32)
        line = np.empty(min(cap + widths[0], n) * mr, dtype=np.float32)
        _gemm_panels(packed, 0, m, block, depth, starts, local, indexed, bf, n, blocks, bias, has_bias, code, alpha,
                     beta, lo, hi, dest, p0, p1, cap, tiles, line, of, 0)


@serial_and_parallel
def _gemm_slices_kernel(packed, m, block, depth, starts, local, indexed, b, dest, widths, tile_bytes, out):
    """A stack of GEMMs (Winograd's slices): packed: float32 (X, P*depth*MR) (pack_slices); starts, local,
    indexed: which of its steps meet which rows of b (see _gemm_panels); b: float32 (X, K', N); out: float32 (X,
    m, N), all C-contiguous: out[x] = slice x of the packed weights (its selected steps) @ b[x] (no epilogue).
    Slices split over the threads."""
    slices, _, n = b.shape
    mr = _ROWS
    panels = (m + mr - 1) // mr
    blocks = _column_blocks(n, widths)
    cap = max(widths[0], tile_bytes // (4 * mr * panels))
    size = panels * depth * mr
    pf = packed.reshape(-1)
    of = out.reshape(-1)
    bias = np.zeros(1, dtype=np.float32)
    for x in numba.prange(slices):
        tiles = np.empty(panels * min(cap + widths[0], n) * mr, dtype=np.float32)
        line = np.empty(min(cap + widths[0], n) * mr, dtype=np.float32)
        _gemm_panels(pf, x * size, m, block, depth, starts, local, indexed, b[x].reshape(-1), n, blocks, bias, False, 0,
                     np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0), dest, 0, panels, cap, tiles,
                     line, of, x * m * n)


def step_selection(packed: PackedWeights, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, local) for :func:`packed_gemm` to read only ``steps`` (sorted distinct int64 step indices of the
    packed matrix, e.g. the active input channels' c*T + t) in place: starts int64 (blocks + 1,), local int64
    (2S,) of pairs: the step relative to its K block's start, and what the microkernel prefetches meanwhile, the
    step PREFETCH_STEPS selected steps later in the order the GEMM reads them. Within a K block a panel's selected
    steps are followed by the next panel's (one block width further on), so a target past the block's last
    selected step lies in a following panel. (Taking the next entry of the table instead pointed the prefetch
    back into the same panel for the last PREFETCH_STEPS steps of every block: ResNet-18's layer-4 weights with
    half the channels, cold, took 1.13 ms against 0.77 for a contiguous half.)"""
    return _step_table(steps, packed.depth, packed.block, PREFETCH_STEPS)


@jit
def _step_table(steps, depth, block, ahead):
    """step_selection's (starts, local) for sorted ``steps`` of a ``depth``-step matrix in K blocks of ``block``,
    prefetching ``ahead`` reads on (compiled: the NumPy version took ~20 us a call, as long as a small GEMM)."""
    blocks = (depth + block - 1) // block
    starts = np.empty(blocks + 1, dtype=np.int64)
    i = 0
    for b in range(blocks + 1):
        while i < steps.shape[0] and steps[i] < b * block:
            i += 1
        starts[b] = i
    local = np.empty(2 * steps.shape[0], dtype=np.int64)
    for b in range(blocks):
        first = starts[b]
        count = starts[b + 1] - first
        width = min(block, depth - b * block)
        for j in range(count):
            local[2 * (first + j)] = steps[first + j] - b * block
            later = j + ahead
            local[2 * (first + j) + 1] = (later // count) * width + steps[first + later % count] - b * block
    return starts, local


def _step_tables(packed: PackedWeights, steps: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(starts, local, indexed) for _gemm_panels: every step of ``packed`` in order (steps None), or only
    ``steps`` read in place (step_selection)."""
    if steps is None:
        return _dense_starts(packed.depth, packed.block), _NO_STEPS, False
    starts, local = step_selection(packed, steps)
    return starts, local, True


@jit
def _increasing_within(steps, depth):
    """Whether int64 ``steps`` is non-empty, strictly increasing, and within 0..depth-1 (compiled: NumPy's
    np.diff check took ~3 us a call, a tenth of a small gated GEMM)."""
    if steps.shape[0] == 0 or steps[0] < 0 or steps[steps.shape[0] - 1] >= depth:
        return False
    for i in range(1, steps.shape[0]):
        if steps[i] <= steps[i - 1]:
            return False
    return True


def _checked_steps(steps: np.ndarray, depth: int) -> int:
    """The number of ``steps`` (sorted distinct int64 within 0..depth-1, else ValueError)."""
    if steps.ndim != 1 or steps.dtype != np.int64 or not _increasing_within(steps, depth):
        raise ValueError(f"steps must be sorted distinct int64 within 0..{depth - 1}")
    return steps.shape[0]


@jit
def _channel_steps(channels, taps):
    """int64 (S*taps,): c*taps + t for each of the sorted ``channels`` and t < taps, in that order."""
    out = np.empty(channels.shape[0] * taps, dtype=np.int64)
    for i in range(channels.shape[0]):
        for t in range(taps):
            out[i * taps + t] = channels[i] * taps + t
    return out


def channel_steps(channels: np.ndarray, taps: int) -> np.ndarray:
    """The steps of a conv's packed weights that its active input ``channels`` (sorted distinct int64) own:
    int64 (S*taps,) = c*taps + t, sorted (the ``steps`` argument of packed_gemm)."""
    return _channel_steps(channels, taps)


def packed_gemm(packed: PackedWeights, m: int, b: np.ndarray, out: np.ndarray, bias: np.ndarray | None,
                act: Activation | None, context: KernelContext | None = None, rows: np.ndarray | None = None,
                parallel_macs: int | None = None, steps: np.ndarray | None = None) -> None:
    """out[rows] = act(A @ b + bias[rows, None]) for A the ``m`` x K matrix of ``packed`` (pack or
    pack_gathered); the other rows of out are not written. ``steps``: int64 (S,) sorted distinct columns of A
    to use (A[:, steps] @ b, read in place from the packed weights: the active input channels' c*T + t), b then
    (S, N).

    b: float32 (K, N) C-contiguous; out: float32 (R, N) C-contiguous; rows: int64 (m,) distinct rows of out
    (None: 0..m-1); bias: float32 (R,) or None. Split over the run's threads by panels when it has
    ``parallel_macs`` MACs or more (None: parallel.MIN_PARALLEL_MACS).
    """
    _require_micro()
    k = packed.depth if steps is None else _checked_steps(steps, packed.depth)
    if m != packed.rows or m <= 0:
        raise ValueError(f"packed weights hold {packed.rows} rows, not {m}")
    if b.ndim != 2 or b.shape[0] != k or not b.flags.c_contiguous or b.dtype != np.float32:
        raise ValueError(f"b must be C-contiguous float32 ({k}, N), got {b.shape} {b.dtype}")
    if out.ndim != 2 or out.shape[1] != b.shape[1] or not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError(f"out must be C-contiguous float32 (R, {b.shape[1]}), got {out.shape}")
    if rows is None:
        if m > out.shape[0]:
            raise ValueError(f"out has {out.shape[0]} rows for {m} results")
        rows = all_indices(m)
    elif rows.shape != (m,) or rows.dtype != np.int64 or rows.min() < 0 or rows.max() >= out.shape[0]:
        raise ValueError(f"rows must be int64 ({m},) within 0..{out.shape[0] - 1}")
    if bias is not None and bias.shape != (out.shape[0],):
        raise ValueError(f"bias must be ({out.shape[0]},), got {bias.shape}")
    code, alpha, beta, lo, hi = activation_params(act)
    has_bias = bias is not None
    threads = None if context is None else context.threads
    macs = m * k * b.shape[1]
    parallel = splits_gemm(threads, macs, None, parallel_macs)
    panels = panel_count(m)
    chunks = min(panels, numba.config.NUMBA_NUM_THREADS if threads is None else threads) if parallel else 1
    starts, local, indexed = _step_tables(packed, steps)
    _gemm_kernel(threads, macs if parallel else 0, packed.data, m, packed.block, packed.depth, starts, local, indexed,
                 b, bias if has_bias else zeros(out.shape[0]), has_bias, code, alpha, beta, lo, hi, rows, _WIDTHS,
                 chunks, TILE_BYTES, out)


def packed_gemm_slices(packed: PackedWeights, b: np.ndarray, out: np.ndarray, context: KernelContext | None = None,
                       parallel: bool | None = None, parallel_macs: int | None = None,
                       steps: np.ndarray | None = None) -> None:
    """out[x] = U[x] @ b[x] for the X slices packed by :func:`pack_slices`: b float32 (X, K, N), out float32 (X, M,
    N), C-contiguous. ``steps``: int64 (S,) sorted distinct columns of every U[x] to use (U[x][:, steps] @ b[x],
    read in place: a Winograd conv's active input channels), b then (X, S, N). Slices split over the run's threads
    when ``parallel`` is True, or is None and the stack has ``parallel_macs`` MACs or more (None:
    parallel.MIN_PARALLEL_MACS)."""
    _require_micro()
    m = packed.rows
    k = packed.depth if steps is None else _checked_steps(steps, packed.depth)
    slices = packed.data.shape[0]
    if packed.data.ndim != 2 or b.shape[:2] != (slices, k) or not b.flags.c_contiguous or b.dtype != np.float32:
        raise ValueError(f"b must be C-contiguous float32 ({slices}, {k}, N), got {b.shape} {b.dtype}")
    if out.shape != (slices, m, b.shape[2]) or not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError(f"out must be C-contiguous float32 {(slices, m, b.shape[2])}, got {out.shape}")
    threads = None if context is None else context.threads
    macs = out.size * k
    run_parallel = splits_gemm(threads, macs, parallel, parallel_macs)
    starts, local, indexed = _step_tables(packed, steps)
    _gemm_slices_kernel(threads, macs if run_parallel else 0, packed.data, m, packed.block, packed.depth, starts,
                        local, indexed, b, all_indices(m), _WIDTHS, TILE_BYTES, out)

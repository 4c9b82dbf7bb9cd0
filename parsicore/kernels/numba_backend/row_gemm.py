"""A gated GEMM that reads the active weight rows in place: out[dest] = act(W[rows] @ B + bias[dest]).

A conv gated by its output channels needs only the active rows of its weights. Packed panels (packed_gemm)
hold MR rows each, and with a random half of the rows active every panel has active rows, so the active ones
are gathered into new panels on every call: ResNet-18's layer4.1.conv1 at 50 % off spent 0.75 ms gathering
and 0.9 ms multiplying (one-off, every kernel of the conv timed in a model run). Here the vectors run along
the output *columns* instead, and each active weight row is a broadcast operand read where it lies
(row-major, one stream per row of the tile): no gather at all, and the output tile is already in row order
(no transposed epilogue).

Microkernel: ``ROWS`` rows (1..ROWS, a loop per count) by up to COLUMNS = VECTORS * LANES output columns,
ROWS * VECTORS accumulator registers. Each step loads VECTORS vectors of B's row (masked past the last
column, so no read passes the row's end) and broadcasts one weight per tile row: 10 loads for 24 FMAs,
against the packed GEMM's 26 for 25. The lanes past N (N = 49: 15 of 64) are wasted. Without an activation,
with ReLU or clip, the last K block's tile stores act(sum + bias) straight to the output rows (tile_finish,
masked past N); other activations go through a tile buffer and the epilogue.

Where it runs: gated calls at N <= COLUMNS and K >= MIN_DEPTH (:func:`pays`), and wide, shallow GEMMs, dense or
gated, N >= WIDE_MIN_COLUMNS and K <= WIDE_MAX_DEPTH (:func:`wide`: MobileNetV2's 1x1 convs at 28x28 and
larger), where BLAS writes its product and the epilogue reads and rewrites it.

AVX-512 only (LANES 16: its tile needs 32 vector registers of 16 floats); nothing else has timed it.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from parsicore.kernels.base import Activation, KernelContext
from parsicore.kernels.numba_backend import packed_gemm
from parsicore.kernels.numba_backend.epilogue import activation_params, clamp_bounds, finish_span, zeros
from parsicore.kernels.numba_backend.packed_gemm import outer_update, step_loop
from parsicore.kernels.numba_backend.parallel import chunk_bounds, jit, serial_and_parallel, splits_gemm

LANES = 16
VECTORS = 4
#: Output columns of one tile.
COLUMNS = LANES * VECTORS
#: Weight rows of one tile (ROWS * VECTORS accumulators of the 32 vector registers).
ROWS = 6
#: K steps per block: B's block (DEPTH x COLUMNS floats, 32 KB) stays in L1 while every tile runs over it.
#: 256 of 512 rows x 4608 by 49, weights evicted by a 256 MB pass, against the packed GEMM on all rows,
#: alternated (one-off checks, the constants edited between runs): 128 with PREFETCH_LINES 0.81-0.85, without
#: 0.90-1.08; 512 with 0.80, without 0.90; unblocked (B re-read from L2 by every tile) 0.78-0.90; unblocked with
#: a software prefetch 256 or 512 weights ahead in each row 0.86-0.89.
DEPTH = 128
#: Lines of the next tile's rows each microkernel call prefetches per row: its K block (DEPTH * 4 bytes); 0: none.
PREFETCH_LINES = DEPTH * 4 // 64

ENABLED = packed_gemm.ENABLED and packed_gemm.MICRO is not None and packed_gemm.MICRO.lanes == LANES

#: The gated GEMMs it takes (against the active rows gathered, then packed_gemm or BLAS): N <= COLUMNS and K >=
#: MIN_DEPTH. ``python scripts/bench_kernels.py --only row_gemm`` (1 thread, half the rows, weights cycled):
#: 512x4608 by 49 0.83x the gathered packed GEMM's time, 512x2304 by 49 0.87x; 16 slices of 256x256 by 49 0.72x
#: gather + OpenBLAS, 36 of 128x128 by 49 0.87x; but 16 of 64x32 by 49 (the default model's conv2) 1.25x slower,
#: and 36 of 64x64 by 196 (N > COLUMNS, tiles with one of four vectors used) 1.34x slower.
MIN_DEPTH = 128


def _emit_rows(builder, rows: int, w_ptr, offs_ptr, b_ptr, ldb_v, ncols_v, c_ptr, depth_v, acc_v,
               finish: tuple | None = None) -> None:
    """LLVM IR for one tile of ``rows`` weight rows (see tile), at the builder's position. ``finish``: (out_ptr,
    douts_ptr, bvals_ptr, lo, hi) to store the finished rows to out instead of the tile (see tile_finish)."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, LANES)
    i64 = ir.IntType(64)
    i32 = ir.IntType(32)
    lanes_i32 = ir.VectorType(i32, LANES)
    mask_t = ir.VectorType(ir.IntType(1), LANES)
    i8p = ir.IntType(8).as_pointer()
    masked_load = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec.as_pointer(), i32, mask_t, vec]),
        f"llvm.masked.load.v{LANES}f32.p0v{LANES}f32")
    hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                          "llvm.prefetch.p0i8")
    zero = ir.Constant(vec, [0.0] * LANES)
    splat = ir.Constant(lanes_i32, [0] * LANES)
    # Lane masks of the valid columns (lane index < ncols), so no load passes the end of B's row.
    ncols_vec = builder.shuffle_vector(
        builder.insert_element(ir.Constant(lanes_i32, ir.Undefined), builder.trunc(ncols_v, i32), ir.Constant(i32, 0)),
        ir.Constant(lanes_i32, ir.Undefined), splat)
    masks = [builder.icmp_signed("<", ir.Constant(lanes_i32, [v * LANES + i for i in range(LANES)]), ncols_vec)
             for v in range(VECTORS)]
    row_ptrs = [builder.gep(w_ptr, [builder.load(builder.gep(offs_ptr, [ir.Constant(i64, r)]))]) for r in range(rows)]

    def c_slot(r, v):
        return builder.bitcast(builder.gep(c_ptr, [ir.Constant(i64, r * COLUMNS + v * LANES)]), vec.as_pointer())

    start = [builder.select(acc_v, builder.load(c_slot(r, v), align=4), zero) for r in range(rows)
             for v in range(VECTORS)]
    loop = step_loop(builder, f"row_gemm{rows}", start)
    step, tile = loop.step, loop.tile
    b_row = builder.gep(b_ptr, [builder.mul(step, ldb_v)])
    b_vecs = [builder.call(masked_load, [builder.bitcast(builder.gep(b_row, [ir.Constant(i64, v * LANES)]),
                                                         vec.as_pointer()), ir.Constant(i32, 4), masks[v], zero])
              for v in range(VECTORS)]
    if PREFETCH_LINES:
        # One line per step of the next tile's rows (offs has ROWS entries of slack), this K block's part of each,
        # over the block's first steps (then the last line again, an L1 hit): a row's block is a short stream
        # (512 B) the hardware prefetcher does not pick up, and a row returns to the next block only after every
        # other tile of the task has run over this one.
        last = ir.Constant(i64, ROWS * PREFETCH_LINES - 1)
        at = builder.select(builder.icmp_signed("<", step, last), step, last)
        ahead = builder.load(builder.gep(offs_ptr, [builder.add(builder.udiv(at, ir.Constant(i64, PREFETCH_LINES)),
                                                                ir.Constant(i64, rows))]))
        line = builder.mul(builder.urem(at, ir.Constant(i64, PREFETCH_LINES)), ir.Constant(i64, 64 // 4))
        target = builder.bitcast(builder.gep(w_ptr, [builder.add(ahead, line)]), i8p)
        builder.call(hint, [target, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    weights = [builder.load(builder.gep(row_ptrs[r], [step]), align=4) for r in range(rows)]
    updated = outer_update(builder, weights, b_vecs, tile)
    loop.close(builder, updated, depth_v)
    if finish is None:
        for r in range(rows):
            for v in range(VECTORS):
                builder.store(updated[r * VECTORS + v], c_slot(r, v), align=4)
        return
    out_ptr, douts_ptr, bvals_ptr, lo_v, hi_v = finish
    masked_store = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [vec, vec.as_pointer(), i32, mask_t]),
        f"llvm.masked.store.v{LANES}f32.p0v{LANES}f32")
    undef = ir.Constant(vec, ir.Undefined)

    def splat_of(value):
        return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef,
                                      ir.Constant(lanes_i32, [0] * LANES))

    lo, hi = splat_of(lo_v), splat_of(hi_v)
    for r in range(rows):
        row_out = builder.gep(out_ptr, [builder.load(builder.gep(douts_ptr, [ir.Constant(i64, r)]))])
        bias = splat_of(builder.load(builder.gep(bvals_ptr, [ir.Constant(i64, r)])))
        for v in range(VECTORS):
            value = builder.fadd(updated[r * VECTORS + v], bias)
            # Ordered compares: a NaN is neither below lo nor above hi, so it stays (as finish_span's selects).
            value = builder.select(builder.fcmp_ordered("<", value, lo), lo, value)
            value = builder.select(builder.fcmp_ordered(">", value, hi), hi, value)
            target = builder.bitcast(builder.gep(row_out, [ir.Constant(i64, v * LANES)]), vec.as_pointer())
            builder.call(masked_store, [value, target, ir.Constant(i32, 4), masks[v]])


def _tile_codegen(context, builder, signature, args, finish: bool):
    """The IR of :func:`tile` (finish False) or :func:`tile_finish`: one case per tile row count."""

    def data(i):
        return context.make_array(signature.args[i])(context, builder, args[i]).data

    w_ptr = builder.gep(data(1), [args[2]])
    offs_ptr = builder.gep(data(3), [args[4]])
    b_ptr = builder.gep(data(5), [args[6]])
    c_ptr = builder.gep(data(9), [args[10]])
    # tile_finish: out at out_off; douts and bvals indexed as offs (from offs_at).
    done = (builder.gep(data(13), [args[14]]), builder.gep(data(15), [args[4]]), builder.gep(data(16), [args[4]]),
            args[17], args[18]) if finish else None
    name = "row_gemm_finish" if finish else "row_gemm"
    merge = builder.append_basic_block(f"{name}_merge")
    switch = builder.switch(args[0], merge)
    for count in range(ROWS, 0, -1):
        case = builder.append_basic_block(f"{name}_rows{count}")
        switch.add_case(ir.Constant(ir.IntType(64), count), case)
        builder.position_at_end(case)
        _emit_rows(builder, count, w_ptr, offs_ptr, b_ptr, args[7], args[8], c_ptr, args[11], args[12], done)
        builder.branch(merge)
    builder.position_at_end(merge)
    return context.get_dummy_value()


@intrinsic
def tile(typingctx, rows, w, w_off, offs, offs_at, b, b_off, ldb, ncols, c, c_off, depth, accumulate):
    """``tile(rows, w, w_off, offs, offs_at, b, b_off, ldb, ncols, c, c_off, depth, accumulate)`` (the row GEMM's
    microkernel, also the fused LKAM gate's bank1): tile row r < ``rows`` (1..ROWS; another count does nothing) at
    c[c_off + r*COLUMNS:] (COLUMNS floats, all written; the columns past ``ncols`` get 0 terms) = (accumulate ?
    itself : 0) + sum over ``depth`` (>= 1) steps t of
    w[w_off + offs[offs_at + r] + t] * b[b_off + t*ldb : +ncols]. w, b, c: float32 1-D C-contiguous; offs: int64
    1-D with ROWS entries past the tile's (prefetched); no bounds checks (the caller keeps every access inside its
    arrays)."""
    sig = types.void(types.intp, w, types.intp, offs, types.intp, b, types.intp, types.intp, types.intp, c,
                     types.intp, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        return _tile_codegen(context, builder, signature, args, False)

    return sig, codegen


@intrinsic
def tile_finish(typingctx, rows, w, w_off, offs, offs_at, b, b_off, ldb, ncols, c, c_off, depth, accumulate, out,
                out_off, douts, bvals, lo, hi):
    """As :func:`tile` (the sums of earlier K blocks read from c when ``accumulate``), but each tile row r then
    goes to out: out[out_off + douts[offs_at + r] + j] = clamp(sum + bvals[offs_at + r], lo, hi) for j < ncols
    (masked stores: nothing past ncols is written; a NaN passes the clamps). lo/hi: float32 (-inf/+inf: no
    activation; 0/+inf: ReLU; the bounds: clip). out: float32 1-D; douts: int64, bvals: float32, per tile row
    (with the offs rows' indexing). c is not written."""
    sig = types.void(types.intp, w, types.intp, offs, types.intp, b, types.intp, types.intp, types.intp, c,
                     types.intp, types.intp, types.boolean, out, types.intp, douts, bvals, types.float32,
                     types.float32)

    def codegen(context, builder, signature, args):
        return _tile_codegen(context, builder, signature, args, True)

    return sig, codegen


@serial_and_parallel
def _row_gemm_kernel(w, w_stride, offs, depth, block, b, n, dest, d_rows, bias, has_bias, code, alpha, beta, lo, hi,
                     chunks, by_columns, out):
    """A stack of X GEMMs (X = b.size // (depth * n); one for a conv, Winograd's slices): w float32 flat, slice x's
    weights from w[x * w_stride]; offs int64 (R + ROWS,): row i's first weight there at offs[i]; b float32 flat
    (X, depth, n); dest int64 (R,); out float32 flat (X, d_rows, n): out[x, dest[i]] = act(row i of slice x @ b[x]
    + bias[dest[i]]). Each slice's tiles of ROWS rows split into ``chunks`` (slices x chunks tasks over the
    threads), or with ``by_columns`` its column blocks (each task every row: B read once in all, W by every task);
    each task runs column blocks of COLUMNS, then K blocks of ``block`` steps (B's block stays in L1
    while every tile of the task runs over it), then its tiles. Without an activation, with ReLU or clip, the last
    K block's tiles store their rows to out themselves (tile_finish); other activations finish each column block
    through the epilogue."""
    r_total = dest.shape[0]
    groups = (r_total + ROWS - 1) // ROWS
    slices = b.shape[0] // (depth * n)
    fused, lo_f, hi_f = clamp_bounds(code, lo, hi)
    # Per active row (ROWS of slack, as offs): its offset in an output slice and its bias.
    douts = np.zeros(r_total + ROWS, dtype=np.int64)
    bvals = np.zeros(r_total + ROWS, dtype=np.float32)
    for i in range(r_total):
        douts[i] = dest[i] * n
        if has_bias:
            bvals[i] = bias[dest[i]]
    column_blocks = (n + COLUMNS - 1) // COLUMNS
    for task in numba.prange(slices * chunks):
        x = task // chunks
        if by_columns:
            g0, g1 = 0, groups
            cb0, cb1 = chunk_bounds(task % chunks, chunks, column_blocks)
        else:
            g0, g1 = chunk_bounds(task % chunks, chunks, groups)
            cb0, cb1 = 0, column_blocks
        tiles = np.empty((g1 - g0) * ROWS * COLUMNS, dtype=np.float32)
        w0 = x * w_stride
        b0 = x * depth * n
        o0 = x * d_rows * n
        for cb in range(cb0, cb1):
            c0 = cb * COLUMNS
            ncols = min(COLUMNS, n - c0)
            for k0 in range(0, depth, block):
                finishing = fused and k0 + block >= depth
                for g in range(g0, g1):
                    if finishing:
                        tile_finish(min(ROWS, r_total - g * ROWS), w, w0 + k0, offs, g * ROWS, b, b0 + k0 * n + c0,
                                    n, ncols, tiles, (g - g0) * ROWS * COLUMNS, min(block, depth - k0), k0 > 0, out,
                                    o0 + c0, douts, bvals, lo_f, hi_f)
                    else:
                        tile(min(ROWS, r_total - g * ROWS), w, w0 + k0, offs, g * ROWS, b, b0 + k0 * n + c0, n,
                             ncols, tiles, (g - g0) * ROWS * COLUMNS, min(block, depth - k0), k0 > 0)
            if fused:
                continue
            for g in range(g0, g1):
                for i in range(min(ROWS, r_total - g * ROWS)):
                    row = dest[g * ROWS + i]
                    bv = bias[row] if has_bias else np.float32(0.0)
                    finish_span(tiles, np.uint64(((g - g0) * ROWS + i) * COLUMNS), out,
                                np.uint64(o0 + row * n + c0), ncols, bv, code, alpha, beta, lo, hi)


@jit
def _within(values, limit):
    """Whether every int64 of ``values`` lies in 0..limit-1 (compiled: NumPy's min and max took ~1 us each)."""
    for i in range(values.shape[0]):
        if values[i] < 0 or values[i] >= limit:
            return False
    return True


@jit
def row_offsets(rows, k):
    """int64 (R + ROWS,): rows[i] * k, then ROWS copies of the last (the slack the microkernel prefetches): the
    ``offs`` of :func:`tile` for rows of ``k`` weights."""
    r = rows.shape[0]
    offs = np.empty(r + ROWS, dtype=np.int64)
    for i in range(r):
        offs[i] = rows[i] * k
    for i in range(r, r + ROWS):
        offs[i] = offs[r - 1]
    return offs


def pays(depth: int, columns: int) -> bool:
    """Whether a gated GEMM of ``depth`` steps by ``columns`` output columns takes the row GEMM here (narrow and
    deep; the wide and shallow ones of :func:`wide` as well, where the conv asks)."""
    return ENABLED and depth >= MIN_DEPTH and columns <= COLUMNS


#: Dense or gated GEMMs with at least WIDE_MIN_COLUMNS columns and at most WIDE_MAX_DEPTH steps (1x1 convs at
#: 28x28 and larger: MobileNetV2's expands and projects) take the row GEMM: its last K block's tiles store
#: act(sum + bias) straight to the output rows, where BLAS writes its product and the epilogue then reads and
#: rewrites it. Each dense 1x1 conv of MobileNetV2 hot, against its BLAS + epilogue (one-off, 1 thread): N 12544
#: 0.71x (K 32) and 0.77x (K 16); N 3136 0.76-0.85x (K 24, 96), 0.94x (K 144); N 784 0.86-0.88x (K 32),
#: 0.94-0.95x (K 144, 192); but N 196 1.05-1.24x slower (K 64-576); and at N 784, K 1152 1.25x slower.
WIDE_MIN_COLUMNS = 784
WIDE_MAX_DEPTH = 192


def wide(depth: int, columns: int) -> bool:
    """Whether a dense or gated GEMM of ``depth`` steps by ``columns`` output columns takes the row GEMM here as
    wide and shallow."""
    return ENABLED and columns >= WIDE_MIN_COLUMNS and depth <= WIDE_MAX_DEPTH


def _require() -> None:
    if not ENABLED:
        raise RuntimeError("no row GEMM on this machine (row_gemm.ENABLED is False)")


def row_gemm(w: np.ndarray, rows: np.ndarray, b: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None,
             act: Activation | None = None, context: KernelContext | None = None, dest: np.ndarray | None = None,
             parallel: bool | None = None, parallel_macs: int | None = None) -> None:
    """out[..., dest[i], :] = act(w[..., rows[i], :] @ b + bias[dest[i]]), one GEMM or a stack of X (Winograd's
    slices): w float32 (M, K) or (X, M, K) C-contiguous, read in place; rows int64 (R,) within 0..M-1; b float32
    ([X,] K, N) C-contiguous; out float32 ([X,] D, N) C-contiguous; dest int64 (R,) distinct rows of out (None:
    ``rows``); bias float32 (D,) or None. Rows of out not in dest are not written. Split over the run's threads
    when ``parallel`` is True, or is None and the call has ``parallel_macs`` MACs or more (None:
    parallel.MIN_PARALLEL_MACS)."""
    _require()
    if w.ndim not in (2, 3) or not w.flags.c_contiguous or w.dtype != np.float32:
        raise ValueError(f"w must be C-contiguous float32 ([X,] M, K), got {w.shape} {w.dtype}")
    m, k = w.shape[-2:]
    if (b.ndim != w.ndim or b.shape[:-1] != w.shape[:-2] + (k,) or not b.flags.c_contiguous
            or b.dtype != np.float32 or k == 0):
        raise ValueError(f"b must be C-contiguous float32 {w.shape[:-2] + (k,)} by N, got {b.shape} {b.dtype}")
    n = b.shape[-1]
    if (out.ndim != w.ndim or out.shape[:-2] != w.shape[:-2] or out.shape[-1] != n or not out.flags.c_contiguous
            or out.dtype != np.float32):
        raise ValueError(f"out must be C-contiguous float32 {w.shape[:-2]} by (D, {n}), got {out.shape}")
    d_rows = out.shape[-2]
    if rows.ndim != 1 or rows.dtype != np.int64 or not _within(rows, m):
        raise ValueError(f"rows must be int64 within 0..{m - 1}")
    dest = rows if dest is None else dest
    if dest.shape != rows.shape or dest.dtype != np.int64 or not _within(dest, d_rows):
        raise ValueError(f"dest must be int64 {rows.shape} within 0..{d_rows - 1}")
    if bias is not None and bias.shape != (d_rows,):
        raise ValueError(f"bias must be ({d_rows},), got {bias.shape}")
    if not rows.size or not n:
        return
    code, alpha, beta, lo, hi = activation_params(act)
    threads = None if context is None else context.threads
    slices = w.shape[0] if w.ndim == 3 else 1
    macs = slices * rows.size * k * n
    run_parallel = splits_gemm(threads, macs, parallel, parallel_macs)
    workers = numba.config.NUMBA_NUM_THREADS if threads is None else threads
    # Split the operand that is not read whole by every task: one GEMM wider than tall (MobileNetV2's wide 1x1s:
    # 96 x 16 by 12544) by column blocks, so B (K x N) is read once in all, not once per task. Split by rows, 96x16
    # by 12544 gained nothing from a second thread (469 against 445 us, one-off); by columns, 2 threads against 1
    # (python scripts/bench_kernels.py --only two_threads, three runs): 0.56-0.69, 144x24 by 3136 0.51-0.89, 192x32
    # by 784 0.74-1.00, the second vCPU's share of the Zen 4 VM changing between runs.
    by_columns = run_parallel and slices == 1 and n > rows.size and n > COLUMNS
    if not run_parallel:
        chunks = 1
    elif by_columns:
        chunks = min(-(-n // COLUMNS), workers)
    else:
        chunks = min(-(-rows.size // ROWS), -(-workers // slices))
    offs = row_offsets(rows, k)
    _row_gemm_kernel(threads, macs if run_parallel else 0, w.reshape(-1), m * k, offs, k, DEPTH, b.reshape(-1), n,
                     dest, d_rows, bias if bias is not None else zeros(d_rows), bias is not None, code, alpha, beta,
                     lo, hi, chunks, by_columns, out.reshape(-1))

"""Microkernel timings at the shapes of the benchmark models, the two variants of each row called in turn in
one process (A B A B ...), median microseconds and the ratio B/A. Serial builds, one BLAS thread.

    python scripts/bench_kernels.py [--rounds 40]

Rows: max/average pool (NumPy backend vs Numba), the whole-row gather (np.take with out= vs the Numba kernel),
the two Numba im2col kernels (row copies vs loads through an index map), the weight gather of channel
subsets (NumPy fancy indexing vs Numba), a 3x3 conv at few output tiles (im2col vs Winograd, whole one-conv
models: the choice winograd.MIN_TILES makes), F(2x2) vs F(4x4) Winograd on the same conv (winograd.tile_size),
a GEMM in one call vs split in 2 or 4 blocks over 2 threads (PARALLEL_GEMM_MACS), a GEMM split over 2 threads
by the helper threads vs in Numba's pool (blas_split), a 1x1 conv with 3/4 of its
inputs on (dense GEMM vs weight-column gather + smaller GEMM), and parsicore's packed GEMM against OpenBLAS
(dense: np.matmul vs packed_gemm on weights packed once, hot and cycling through weights that do not fit in
cache; gated: gather_weights + np.matmul vs pack_gathered + packed_gemm), and row-gated GEMMs with the active
rows gathered against row_gemm reading them in place, dense wide 1x1 GEMMs (OpenBLAS + epilogue against the
row GEMM finishing its own tiles), 3x3 depthwise convs (phase planes against flat planes), and residual Adds with
their ReLU (the numpy backend's two passes against the numba kernel's one), and the flat depthwise kernel and the
wide row GEMM on 1 thread against 2. Every variant's
output is checked against the first's.
The board settings (OPENBLAS_CORETYPE) are applied first, as the CLI does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parsicore.boards import configure  # noqa: E402

configure()  # before numpy: OpenBLAS reads OPENBLAS_CORETYPE when it loads

import numpy as np  # noqa: E402

import parsicore  # noqa: E402
from parsicore.builder import ModelBuilder  # noqa: E402
from parsicore.kernels.base import Activation, KernelContext, KernelSpec  # noqa: E402
from parsicore.kernels.numba_backend import blas_split, packed_gemm, row_gemm  # noqa: E402
from parsicore.kernels.numba_backend import conv as numba_conv  # noqa: E402
from parsicore.kernels.numba_backend import elementwise as numba_elementwise  # noqa: E402
from parsicore.kernels.numba_backend import gather as numba_gather  # noqa: E402
from parsicore.kernels.numba_backend import parallel as numba_parallel  # noqa: E402
from parsicore.kernels.numba_backend import pool as numba_pool  # noqa: E402
from parsicore.kernels.numba_backend import winograd as numba_winograd  # noqa: E402
from parsicore.kernels.numpy_backend import conv as numpy_conv  # noqa: E402
from parsicore.kernels.numpy_backend import elementwise as numpy_elementwise  # noqa: E402
from parsicore.kernels.numpy_backend import pool as numpy_pool  # noqa: E402
from parsicore.kernels.numpy_backend import winograd  # noqa: E402
from parsicore.ops.pool import AveragePoolAttrs, MaxPoolAttrs, pool_output_size  # noqa: E402
from parsicore.threads import apply as pin_blas_threads  # noqa: E402
from parsicore.threads import run_chunks  # noqa: E402


def alternate(a: Callable[[], None], b: Callable[[], None], rounds: int) -> tuple[float, float]:
    a()
    b()
    ta, tb = [], []
    for _ in range(rounds):
        for f, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
    return float(np.median(ta)) * 1e6, float(np.median(tb)) * 1e6


def row(what: str, a_name: str, b_name: str, times: tuple[float, float]) -> None:
    ta, tb = times
    print(f"| {what} | {a_name} {ta:.1f} | {b_name} {tb:.1f} | {tb / ta:.2f} |")


def pools(rng: np.random.Generator, rounds: int) -> None:
    cases = [("MaxPool", (32, 28, 28), {"kernel": (2, 2)}), ("MaxPool", (64, 14, 14), {"kernel": (2, 2)}),
             ("MaxPool", (64, 112, 112), {"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1)}),
             ("AveragePool", (32, 28, 28), {"kernel": (2, 2)}),
             ("AveragePool", (64, 56, 56), {"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1)})]
    for op, (c, h, w), kw in cases:
        attrs = (MaxPoolAttrs if op == "MaxPool" else AveragePoolAttrs)(**kw)
        kh, kwd = attrs.kernel
        sh, sw = attrs.strides
        ho = pool_output_size(h, kh, sh, attrs.pads[0], attrs.pads[2], False)
        wo = pool_output_size(w, kwd, sw, attrs.pads[1], attrs.pads[3], False)
        spec = KernelSpec(op, attrs, {}, ((c, h, w),), ((c, ho, wo),))
        make = "make_max_pool" if op == "MaxPool" else "make_average_pool"
        slow, fast = getattr(numpy_pool, make)(spec), getattr(numba_pool, make)(spec)
        x = rng.standard_normal((1, c, h, w), dtype=np.float32)
        y1, y2 = np.empty((1, c, ho, wo), np.float32), np.empty((1, c, ho, wo), np.float32)
        slow([x], [y1])
        fast([x], [y2])
        np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
        row(f"{op} {kw} on {c}x{h}x{w}", "numpy", "numba",
            alternate(partial(slow, [x], [y1]), partial(fast, [x], [y2]), rounds))


def row_gathers(rng: np.random.Generator, rounds: int) -> None:
    for blocks, k, length in [(1, 512, 4608), (1, 256, 2304), (16, 256, 256), (1, 96, 12544)]:
        src = rng.standard_normal((blocks, k, length), dtype=np.float32)
        rows = np.sort(rng.permutation(k)[: k // 2]).astype(np.int64)
        o1, o2 = np.empty((blocks, rows.size, length), np.float32), np.empty((blocks, rows.size, length), np.float32)
        numpy_conv.gather_rows(src, rows, o1)
        numba_gather._gather_rows_kernel.serial(src, rows, o2)
        np.testing.assert_array_equal(o1, o2)
        row(f"half the rows of ({blocks}, {k}, {length})", "np.take", "numba",
            alternate(partial(numpy_conv.gather_rows, src, rows, o1),
                      partial(numba_gather._gather_rows_kernel.serial, src, rows, o2), rounds))


def im2cols(rng: np.random.Generator, rounds: int) -> None:
    for c, h, k, stride in [(512, 7, 3, 1), (64, 7, 3, 1), (256, 14, 3, 1), (256, 14, 3, 2), (64, 14, 3, 1),
                            (128, 28, 3, 1), (64, 56, 3, 2)]:
        ho = (h + 2 - k) // stride + 1
        x = rng.standard_normal((c, h, h), dtype=np.float32)
        channels = np.arange(c, dtype=np.int64)
        o1, o2 = np.empty((c * k * k, ho * ho), np.float32), np.empty((c * k * k, ho * ho), np.float32)
        args = (k, k, stride, stride, 1, 1, 1, 1, ho, ho)
        rows_kernel = partial(numba_conv._im2col_kernel.serial, x, channels, *args, o1)
        gather_kernel = partial(numba_conv._im2col_gather_kernel.serial, x, channels, *args,
                                numba_conv.chunk_count(c), o2)
        rows_kernel()
        gather_kernel()
        np.testing.assert_array_equal(o1, o2)
        row(f"im2col {c}x{h}x{h}, {k}x{k} stride {stride}", "row copies", "index map",
            alternate(rows_kernel, gather_kernel, rounds))


def weight_gathers(rng: np.random.Generator, rounds: int) -> None:
    for k, c, taps in [(512, 512, 9), (256, 256, 9), (128, 128, 9)]:
        w = rng.standard_normal((k, c, taps), dtype=np.float32)
        rows = np.arange(k, dtype=np.int64)
        chans = np.sort(rng.permutation(c)[: c // 2]).astype(np.int64)
        o1, o2 = np.empty((k, chans.size * taps), np.float32), np.empty((k, chans.size * taps), np.float32)
        numpy_conv.gather_weights(w, None, chans, o1)
        numba_conv._gather_weights_kernel.serial(w, rows, chans, o2)
        np.testing.assert_array_equal(o1, o2)
        row(f"weights ({k}, half of {c}, {taps})", "numpy", "numba",
            alternate(partial(numpy_conv.gather_weights, w, None, chans, o1),
                      partial(numba_conv._gather_weights_kernel.serial, w, rows, chans, o2), rounds))


def _one_conv(weight: np.ndarray, hw: int, min_tiles: int, min_tiles_f4: int | None = None) -> parsicore.Model:
    """A 3x3 pad-1 conv (weight (K, C, 3, 3)) + ReLU model, loaded with winograd.MIN_TILES = min_tiles (and
    MIN_TILES_F4 = min_tiles_f4 when given; the path and tile size are fixed at load)."""
    k, c = weight.shape[:2]
    b = ModelBuilder("one-conv", license="MIT", producer="scripts/bench_kernels.py")
    b.add_input("x", (None, c, hw, hw))
    b.add_node("Conv", ["x"], ["y"], name="conv", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": weight, "bias": np.zeros(k, np.float32)})
    b.add_node("Relu", ["y"], ["r"], name="relu")
    b.add_output("r")
    saved = winograd.MIN_TILES, winograd.MIN_TILES_F4, winograd.MIN_WORK_F4
    winograd.MIN_TILES = min_tiles
    if min_tiles_f4 is not None:
        winograd.MIN_TILES_F4, winograd.MIN_WORK_F4 = min_tiles_f4, 0
    try:
        return parsicore.load(b.build(), backend="numba", threads=1)
    finally:
        winograd.MIN_TILES, winograd.MIN_TILES_F4, winograd.MIN_WORK_F4 = saved


def winograd_f4(rng: np.random.Generator, rounds: int) -> None:
    """F(2x2) against F(4x4) on the same 3x3 conv (the choice winograd.MIN_TILES_F4 / MIN_WORK_F4 make)."""
    for hw, sizes in ((56, ((32, 32), (64, 64))), (28, ((32, 32), (64, 64), (128, 128))),
                      (20, ((64, 64), (128, 128))), (14, ((64, 64), (128, 128), (256, 256))),
                      (32, ((16, 16), (32, 32), (64, 64), (128, 128)))):
        for c, k in sizes:
            weight = (rng.standard_normal((k, c, 3, 3)) * 0.1).astype(np.float32)
            f2, f4 = _one_conv(weight, hw, 1, 1 << 30), _one_conv(weight, hw, 1, 1)
            x = rng.random((1, c, hw, hw), dtype=np.float32)
            y1, y2 = f2(x), f4(x)
            np.testing.assert_allclose(y2, y1, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(y1).max())))
            th, tw = winograd.tiles(hw, hw, 4)
            row(f"conv 3x3 {c}->{k} at {hw}x{hw} ({th * tw} 4x4 tiles), whole call", "F(2x2)", "F(4x4)",
                alternate(partial(f2, x), partial(f4, x), rounds))


def winograd_tiles(rng: np.random.Generator, rounds: int) -> None:
    for hw in (7, 10, 5):
        for c, k in ((32, 32), (64, 64), (64, 128), (128, 128), (256, 256), (512, 512)):
            weight = (rng.standard_normal((k, c, 3, 3)) * 0.1).astype(np.float32)
            im2col, wino = _one_conv(weight, hw, 1 << 30), _one_conv(weight, hw, 1)
            x = rng.random((1, c, hw, hw), dtype=np.float32)
            y1, y2 = im2col(x), wino(x)
            np.testing.assert_allclose(y2, y1, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(y1).max())))
            th, tw = winograd.tiles(hw, hw)
            row(f"conv 3x3 {c}->{k} at {hw}x{hw} ({th * tw} tiles), whole call", "im2col", "winograd",
                alternate(partial(im2col, x), partial(wino, x), rounds))


def block_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, by_rows: bool, step: int, i: int) -> None:
    """Block i of out = a @ b split as ConvKernel._matmul splits it: rows of a and out, or columns of b and out."""
    s = slice(i * step, (i + 1) * step)
    if by_rows:
        np.matmul(a[s], b, out=out[s])
    else:
        np.matmul(a, b[:, s], out=out[:, s])


def split_operands(rng: np.random.Generator, m: int, k: int,
                   n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """a (m, k), b (k, n), two outputs (m, n) and whether ConvKernel._matmul splits this GEMM by rows."""
    a = rng.random((m, k), dtype=np.float32)
    b = rng.random((k, n), dtype=np.float32)
    return a, b, np.empty((m, n), np.float32), np.empty((m, n), np.float32), m >= 64 and a.size >= b.size


def gemm_splits(rng: np.random.Generator, rounds: int) -> None:
    """One GEMM in one call against split in 2 and in 4 blocks over 2 threads (PARALLEL_GEMM_MACS,
    GEMM_CHUNKS_PER_THREAD), by rows or columns as ConvKernel._matmul splits it."""
    for m, kk, n in [(96, 16, 12544), (144, 24, 3136), (576, 96, 196), (960, 160, 49), (64, 147, 12544),
                     (256, 2304, 196), (512, 4608, 49)]:
        a, b, o1, o2, by_rows = split_operands(rng, m, kk, n)
        np.matmul(a, b, out=o1)
        for blocks in (2, 4):
            step = -(-(m if by_rows else n) // blocks)
            chunk = partial(block_matmul, a, b, o2, by_rows, step)
            count = -(-(m if by_rows else n) // step)
            o2.fill(np.nan)
            run_chunks(chunk, count, 2)
            np.testing.assert_allclose(o2, o1, rtol=1e-5)
            row(f"GEMM {m}x{kk}x{n} ({m * kk * n / 1e6:.1f}M MACs)", "1 call",
                f"{blocks} {'row' if by_rows else 'column'} blocks, 2 threads",
                alternate(partial(np.matmul, a, b, out=o1), partial(run_chunks, chunk, count, 2), rounds))


def pool_splits(rng: np.random.Generator, rounds: int) -> None:
    """A GEMM split in 2 blocks over 2 threads: by parsicore's helper threads (run_chunks, the numpy backend's
    split) against Numba's pool calling OpenBLAS per block (blas_split, the numba backend's), under this
    process's wait policy (OMP_WAIT_POLICY / GOMP_SPINCOUNT as set when it started)."""
    pin_blas_threads(2)  # OpenBLAS single-threaded: each block runs on the thread that calls it
    for m, kk, n in [(144, 24, 3136), (384, 64, 196), (576, 96, 196), (960, 160, 49), (64, 576, 3136),
                     (256, 2304, 196), (512, 4608, 49)]:
        a, b, o1, o2, by_rows = split_operands(rng, m, kk, n)
        chunk = partial(block_matmul, a, b, o1, by_rows, -(-(m if by_rows else n) // 2))
        row(f"GEMM {m}x{kk}x{n} ({m * kk * n / 1e6:.1f}M MACs)", "helper threads", "Numba pool",
            alternate(partial(run_chunks, chunk, 2, 2), partial(blas_split.split_matmul, a, b, o2, 2, by_rows),
                      rounds))
        np.testing.assert_allclose(o2, o1, rtol=1e-5)


def pointwise_input_gathers(rng: np.random.Generator, rounds: int) -> None:
    for k, c, p in [(320, 960, 49), (160, 960, 49), (96, 576, 196), (24, 144, 3136)]:
        w = rng.standard_normal((k, c, 1), dtype=np.float32)
        chans = np.sort(rng.permutation(c)[: round(0.75 * c)]).astype(np.int64)
        x = rng.random((c, p), dtype=np.float32)
        x[np.setdiff1d(np.arange(c), chans)] = 0.0  # the inactive input channels are zero
        compact = np.ascontiguousarray(x[chans])
        gathered = np.empty((k, chans.size), np.float32)
        o1, o2 = np.empty((k, p), np.float32), np.empty((k, p), np.float32)
        rows = np.arange(k, dtype=np.int64)

        def gated(w=w, rows=rows, chans=chans, gathered=gathered, compact=compact, o2=o2) -> None:
            numba_conv._gather_weights_kernel.serial(w, rows, chans, gathered)
            np.matmul(gathered, compact, out=o2)

        dense = partial(np.matmul, w.reshape(k, c), x, out=o1)
        dense()
        gated()
        np.testing.assert_allclose(o2, o1, rtol=1e-4, atol=1e-4)
        row(f"1x1 {c}->{k} at {p} pixels, 3/4 of inputs on", "dense GEMM", "gather + GEMM",
            alternate(dense, gated, rounds))


def packed_gemms(rng: np.random.Generator, rounds: int) -> None:
    if not packed_gemm.available():
        print("| packed GEMM | not built on this machine (no vector FMA) | | |")
        return
    context = KernelContext()
    context.threads = 1
    for m, k, n in [(512, 4608, 49), (512, 2304, 49), (256, 2304, 196), (128, 1152, 784), (512, 256, 49),
                    (320, 960, 49), (160, 576, 49), (128, 576, 64), (256, 2304, 16), (32, 288, 49)]:
        w = rng.standard_normal((m, k), dtype=np.float32)
        x = rng.standard_normal((k, n), dtype=np.float32)
        packed = packed_gemm.pack(w)
        o1, o2 = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
        blas = partial(np.matmul, w, x, out=o1)
        own = partial(packed_gemm.packed_gemm, packed, m, x, o2, None, None, context)
        blas()
        own()
        np.testing.assert_allclose(o2, o1, rtol=1e-3, atol=1e-3 * float(np.abs(o1).max()))
        row(f"GEMM {m}x{k}x{n}, hot weights", "OpenBLAS", "packed", alternate(blas, own, rounds))
    # Cold: as in a model, whose late-layer weights (9.4 MB each) are evicted between calls.
    m, k, n = 512, 4608, 49
    ws = [rng.standard_normal((m, k), dtype=np.float32) for _ in range(6)]
    packs = [packed_gemm.pack(w) for w in ws]
    x = rng.standard_normal((k, n), dtype=np.float32)
    o = np.empty((m, n), np.float32)
    turn = [0, 0]

    def cold_blas() -> None:
        turn[0] = (turn[0] + 1) % len(ws)
        np.matmul(ws[turn[0]], x, out=o)

    def cold_own() -> None:
        turn[1] = (turn[1] + 1) % len(packs)
        packed_gemm.packed_gemm(packs[turn[1]], m, x, o, None, None, context)

    row(f"GEMM {m}x{k}x{n}, 6 weight matrices in turn (cold)", "OpenBLAS", "packed",
        alternate(cold_blas, cold_own, rounds * 3))
    for kout, c, frac_rows, frac_chans in [(512, 512, 0.5, 0.5), (256, 256, 0.5, 0.5), (128, 128, 0.5, 1.0),
                                           (128, 64, 1.0, 1.0), (128, 128, 0.25, 0.5)]:
        taps = rng.standard_normal((kout, c, 9), dtype=np.float32)
        rows = np.sort(rng.permutation(kout)[:int(kout * frac_rows)]).astype(np.int64)
        chans = np.sort(rng.permutation(c)[:int(c * frac_chans)]).astype(np.int64)
        x = rng.standard_normal((chans.size * 9, 49), dtype=np.float32)
        gathered = np.empty((rows.size, chans.size * 9), np.float32)
        scratch = np.empty(packed_gemm.packed_size(rows.size, chans.size * 9), np.float32)
        o1, o2 = np.empty((rows.size, 49), np.float32), np.empty((rows.size, 49), np.float32)

        def blas_gated(taps=taps, rows=rows, chans=chans, gathered=gathered, x=x, o1=o1) -> None:
            numba_conv.gather_weights(taps, rows, chans, gathered, context)
            np.matmul(gathered, x, out=o1)

        def own_gated(taps=taps, rows=rows, chans=chans, scratch=scratch, x=x, o2=o2) -> None:
            weights = packed_gemm.pack_gathered(taps, rows, chans, scratch, context)
            packed_gemm.packed_gemm(weights, rows.size, x, o2, None, None, context)

        blas_gated()
        own_gated()
        np.testing.assert_allclose(o2, o1, rtol=1e-3, atol=1e-3 * float(np.abs(o1).max()))
        row(f"gated GEMM {rows.size} of {kout} rows, {chans.size} of {c} channels x9, 49 columns",
            "gather + OpenBLAS", "gather-pack + packed", alternate(blas_gated, own_gated, rounds))


def row_gemms(rng: np.random.Generator, rounds: int) -> None:
    """Row-gated GEMMs, half the rows on, weights cycled through sets that fill 64 MB (as in a model, whose weights
    are not in cache when their conv runs): the active rows gathered (packed panels + packed_gemm for a conv's
    GEMM, gather_transformed + OpenBLAS for Winograd slices) against row_gemm reading them in place."""
    if not row_gemm.ENABLED:
        print("| row GEMM | not built on this machine (needs the 16-lane packed GEMM tile) | | |")
        return
    context = KernelContext()
    context.threads = 1
    for x, m, k, n in [(None, 512, 4608, 49), (None, 512, 2304, 49), (16, 256, 256, 49), (36, 128, 128, 49),
                       (16, 64, 32, 49), (36, 64, 64, 196)]:
        lead = () if x is None else (x,)
        sets = max(2, -(-(64 << 20) // (4 * m * k * (x or 1))))
        ws = [rng.standard_normal((*lead, m, k), dtype=np.float32) for _ in range(sets)]
        rows = np.sort(rng.permutation(m)[:m // 2]).astype(np.int64)
        b = rng.standard_normal((*lead, k, n), dtype=np.float32)
        o1, o2 = np.empty((*lead, rows.size, n), np.float32), np.empty((*lead, rows.size, n), np.float32)
        dest = np.arange(rows.size, dtype=np.int64)
        turn = [0, 0]
        if x is None:
            scratch = np.empty(packed_gemm.packed_size(rows.size, k), np.float32)

            def gathered(ws=ws, rows=rows, b=b, o1=o1, scratch=scratch, turn=turn) -> None:
                turn[0] = (turn[0] + 1) % len(ws)
                w = ws[turn[0]]
                weights = packed_gemm.pack_gathered(w.reshape(*w.shape, 1), rows, None, scratch, context)
                packed_gemm.packed_gemm(weights, rows.size, b, o1, None, None, context)
            what = f"row-gated GEMM {rows.size} of {m} rows x {k} by {n}"
            a_name = "gather-pack + packed"
        else:
            u = np.empty((x, rows.size, k), np.float32)

            def gathered(ws=ws, rows=rows, b=b, o1=o1, u=u, turn=turn) -> None:
                turn[0] = (turn[0] + 1) % len(ws)
                numba_winograd.gather_transformed(ws[turn[0]], rows, None, u, context)
                np.matmul(u, b, out=o1)
            what = f"row-gated slices {x} x {rows.size} of {m} rows x {k} by {n}"
            a_name = "gather + OpenBLAS"

        def in_place(ws=ws, rows=rows, b=b, o2=o2, dest=dest, turn=turn) -> None:
            turn[1] = (turn[1] + 1) % len(ws)
            row_gemm.row_gemm(ws[turn[1]], rows, b, o2, None, None, context, dest=dest)

        turn[:] = [len(ws) - 1, len(ws) - 1]  # both start on set 0: the outputs compare
        gathered()
        in_place()
        np.testing.assert_allclose(o2, o1, rtol=1e-3, atol=1e-3 * float(np.abs(o1).max()))
        row(f"{what} ({sets} weight sets in turn)", a_name, "row GEMM", alternate(gathered, in_place, rounds))


def wide_row_gemms(rng: np.random.Generator, rounds: int) -> None:
    """Dense wide, shallow 1x1 GEMMs (MobileNetV2's expands and projects, bias + ReLU6): OpenBLAS then the numba
    epilogue, against row_gemm with the epilogue in its tiles (row_gemm.wide takes it at N >= 784, K <= 192)."""
    if not row_gemm.ENABLED:
        print("| wide row GEMM | not built on this machine (needs the 16-lane packed GEMM tile) | | |")
        return
    context = KernelContext()
    context.threads = 1
    relu6 = Activation("clip", lo=0.0, hi=6.0)
    for m, k, n in [(96, 16, 12544), (16, 32, 12544), (144, 24, 3136), (24, 144, 3136), (192, 32, 784),
                    (32, 192, 784), (384, 64, 196)]:
        w = rng.standard_normal((m, k), dtype=np.float32) / np.float32(np.sqrt(k))
        b = rng.standard_normal((k, n), dtype=np.float32)
        bias = rng.standard_normal(m).astype(np.float32)
        o1, o2 = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
        every = np.arange(m, dtype=np.int64)

        def blas(w=w, b=b, bias=bias, o1=o1) -> None:
            np.matmul(w, b, out=o1)
            numba_conv.bias_activation(o1[None], bias, relu6, context)

        def rows(w=w, b=b, bias=bias, o2=o2, every=every) -> None:
            row_gemm.row_gemm(w, every, b, o2, bias, relu6, context)

        blas()
        rows()
        np.testing.assert_allclose(o2, o1, rtol=1e-3, atol=1e-3)
        taken = "taken" if row_gemm.wide(k, n) else "not taken"
        row(f"dense 1x1 GEMM {m}x{k} by {n} + bias + ReLU6 (row_gemm.wide: {taken})", "OpenBLAS + epilogue",
            "row GEMM", alternate(blas, rows, rounds))


def depthwise_3x3(rng: np.random.Generator, rounds: int) -> None:
    """MobileNetV2's 3x3 depthwise convs (padding 1, bias + ReLU6): the phase-plane kernel (taps3x3) against the
    flat-plane one (flat3x3, where numba_conv.flat_3x3_fits takes it)."""
    context = KernelContext()
    context.threads = 1
    relu6 = Activation("clip", lo=0.0, hi=6.0)
    fits = numba_conv.flat_3x3_fits
    for c, size, stride in [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2),
                            (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1)]:
        out = (size - 1) // stride + 1
        geom = numpy_conv.ConvGeometry(c, size, size, c, out, out, 3, 3, stride, stride, 1, 1, 1, 1, 1, 1, c)
        x = rng.standard_normal((1, c, size, size), dtype=np.float32)
        filters = rng.standard_normal((c, 3, 3), dtype=np.float32) / np.float32(3.0)
        bias = rng.standard_normal(c).astype(np.float32)
        o1, o2 = np.empty((1, c, out, out), np.float32), np.empty((1, c, out, out), np.float32)

        def phases(x=x, filters=filters, bias=bias, o1=o1, geom=geom) -> None:
            numba_conv.flat_3x3_fits = lambda g: False  # the rule's other answer, for this call only
            try:
                numba_conv.depthwise(x, filters, bias, relu6, None, geom, o1, context)
            finally:
                numba_conv.flat_3x3_fits = fits

        def flat(x=x, filters=filters, bias=bias, o2=o2, geom=geom) -> None:
            numba_conv.depthwise(x, filters, bias, relu6, None, geom, o2, context)

        phases()
        flat()
        np.testing.assert_allclose(o2, o1, rtol=1e-4, atol=1e-4)
        taken = "taken" if fits(geom) else "not taken"
        row(f"depthwise 3x3 {c}x{size}x{size} stride {stride} + bias + ReLU6 (flat_3x3_fits: {taken})",
            "phase planes", "flat planes", alternate(phases, flat, rounds))


def two_threads(rng: np.random.Generator, rounds: int) -> None:
    """The same kernel on 1 thread and on 2, under this process's wait policy (spinning on x86-64): MobileNetV2's
    flat 3x3 depthwise convs (bias + ReLU6) and its wide 1x1 row GEMMs (a GEMM wider than tall splits by column
    blocks). Parallel builds forced (parallel.MIN_PARALLEL_WORK 0, the row GEMM's parallel=True on 2 threads)."""
    one, two = KernelContext(), KernelContext()
    one.threads, two.threads = 1, 2
    relu6 = Activation("clip", lo=0.0, hi=6.0)
    saved = numba_parallel.MIN_PARALLEL_WORK
    numba_parallel.MIN_PARALLEL_WORK = 0
    try:
        for c, size in [(32, 112), (144, 56), (192, 28), (384, 14), (960, 7)]:
            geom = numpy_conv.ConvGeometry(c, size, size, c, size, size, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, c)
            x = rng.standard_normal((1, c, size, size), dtype=np.float32)
            filters = rng.standard_normal((c, 3, 3), dtype=np.float32) / np.float32(3.0)
            bias = rng.standard_normal(c).astype(np.float32)
            o1, o2 = np.empty((1, c, size, size), np.float32), np.empty((1, c, size, size), np.float32)
            runs = [partial(numba_conv.depthwise, x, filters, bias, relu6, None, geom, out, ctx)
                    for out, ctx in ((o1, one), (o2, two))]
            row(f"depthwise 3x3 {c}x{size}x{size} (flat planes) + bias + ReLU6", "1 thread", "2 threads",
                alternate(*runs, rounds))
            np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-5)
        if not row_gemm.ENABLED:
            print("| wide row GEMM | not built on this machine (needs the 16-lane packed GEMM tile) | | |")
            return
        for m, k, n in [(96, 16, 12544), (144, 24, 3136), (192, 32, 784)]:
            w = rng.standard_normal((m, k), dtype=np.float32) / np.float32(np.sqrt(k))
            b = rng.standard_normal((k, n), dtype=np.float32)
            bias = rng.standard_normal(m).astype(np.float32)
            o1, o2 = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
            every = np.arange(m, dtype=np.int64)
            runs = [partial(row_gemm.row_gemm, w, every, b, out, bias, relu6, ctx, parallel=ctx is two)
                    for out, ctx in ((o1, one), (o2, two))]
            row(f"row GEMM {m}x{k} by {n} + bias + ReLU6", "1 thread", "2 threads", alternate(*runs, rounds))
            np.testing.assert_allclose(o2, o1, rtol=1e-4, atol=1e-4)
    finally:
        numba_parallel.MIN_PARALLEL_WORK = saved


def residual_adds(rng: np.random.Generator, rounds: int) -> None:
    """Residual Adds and their ReLU (float32 (1, C, H, W) + the same shape; ResNet-18's four, and two of
    MobileNetV2's shapes, whose Adds have no activation): the numpy backend's kernel (np.add, then
    np.maximum) against the numba backend's one pass."""
    relu = Activation("relu")
    for shape in [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (24, 56, 56), (96, 14, 14)]:
        spec = KernelSpec("Add", None, {}, (shape, shape), (shape,), relu)
        a, b = (rng.standard_normal((1, *shape), dtype=np.float32) for _ in range(2))
        o1, o2 = np.empty_like(a), np.empty_like(a)
        two_passes, one_pass = numpy_elementwise.make_binary(spec), numba_elementwise.make_binary(spec)
        two_passes([a, b], [o1])
        one_pass([a, b], [o2])
        np.testing.assert_allclose(o2, o1, rtol=1e-6, atol=1e-6)
        row(f"Add + ReLU {shape[0]}x{shape[1]}x{shape[2]}", "np.add + np.maximum", "numba one pass",
            alternate(partial(two_passes, [a, b], [o1]), partial(one_pass, [a, b], [o2]), rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--only", default=None, help="comma-separated row groups (default: all): " + ", ".join(PARTS))
    args = ap.parse_args()
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    print("| kernel and shape | A us | B us | B/A |\n|---|---|---|---|")
    for name in (args.only.split(",") if args.only else PARTS):
        PARTS[name](rng, args.rounds)


PARTS = {"pools": pools, "row_gathers": row_gathers, "im2cols": im2cols, "weight_gathers": weight_gathers,
         "winograd_tiles": winograd_tiles, "winograd_f4": winograd_f4, "gemm_splits": gemm_splits,
         "pool_splits": pool_splits,
         "pointwise_input_gathers": pointwise_input_gathers, "packed_gemm": packed_gemms, "row_gemm": row_gemms,
         "wide_row_gemm": wide_row_gemms, "depthwise_3x3": depthwise_3x3,
         "residual_add": residual_adds, "two_threads": two_threads}


if __name__ == "__main__":
    main()

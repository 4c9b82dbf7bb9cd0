"""Large GEMMs split over Numba's thread pool, each chunk one call of OpenBLAS's ``cblas_sgemm``.

Why: a run with 2+ threads had two pools, Numba's (its kernels) and parsicore's Python helper threads
(:func:`parsicore.threads.run_chunks`, the BLAS chunks), each with its own hand-off. In one pool every split of a
run waits the same way (:mod:`parsicore.threads`: spinning briefly on x86-64, asleep elsewhere), and no helper
thread competes with a spinning OpenMP thread for its core (a twelfth-session finding: ResNet-18-gated50 1.15x
slower with spinning OpenMP threads beside the helper threads). ``python scripts/bench_kernels.py --only
pool_splits`` (2 threads, 2 blocks, against the helper threads; fourteenth session, 2-vCPU Zen 4 VM): asleep
0.99-1.02, spinning 0.61-0.83. In models with sleeping threads (``python scripts/ab_checkouts.py MODEL BASE .
--threads 2``): ResNet-18-gated50 0.933, ResNet-18 1.004, MobileNetV2 0.996.

How: Numba calls C functions through a pointer (an ``@intrinsic`` that casts an integer address to
``cblas_sgemm``'s type and calls it). The address is a run-time argument, not a constant compiled in, so the
kernels stay in Numba's on-disk cache. OpenBLAS is pinned to one thread (:func:`parsicore.threads.apply`), so
each call runs in the thread that makes it; OpenBLAS allows concurrent calls from several threads (as NumPy's
matmul from several Python threads, which the helper threads already did).

The address is looked up in the OpenBLAS NumPy loaded (:func:`parsicore.threads.openblas`): its
``cblas_sgemm`` under the spellings of :data:`parsicore.threads.SYMBOL_FORMS` (``64_``: the ILP64 builds of
NumPy's wheels, 64-bit integers). No OpenBLAS, or no ``cblas_sgemm`` in it: :func:`available` is False and the
conv kernels keep the helper threads.

Figures: ``python scripts/bench_kernels.py --only pool_splits``.
"""

from __future__ import annotations

import ctypes
import functools

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from parsicore import threads as thread_settings
from parsicore.kernels.numba_backend.parallel import chunk_bounds, serial_and_parallel

_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS_ORDER.CblasRowMajor, CBLAS_TRANSPOSE.CblasNoTrans


def _sgemm_codegen(int_bits: int):  # type: ignore[no-untyped-def]
    """LLVM code for C = A @ B (row-major, alpha 1, beta 0) through the ``cblas_sgemm`` at an address; BLAS
    integers ``int_bits`` wide (64 for ILP64 builds, 32 otherwise), the enums C ints."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        address, m, n, k, a, lda, b, ldb, c, ldc = args
        i32, f32 = ir.IntType(32), ir.FloatType()
        blas_int = ir.IntType(int_bits)
        fptr = ir.PointerType(f32)
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, blas_int, blas_int, blas_int, f32, fptr, blas_int,
                                               fptr, blas_int, f32, fptr, blas_int])
        fn = builder.inttoptr(address, fnty.as_pointer())

        def integer(v):  # type: ignore[no-untyped-def]
            return v if int_bits == 64 else builder.trunc(v, blas_int)

        builder.call(fn, [ir.Constant(i32, _ROW_MAJOR), ir.Constant(i32, _NO_TRANS), ir.Constant(i32, _NO_TRANS),
                          integer(m), integer(n), integer(k), ir.Constant(f32, 1.0), builder.inttoptr(a, fptr),
                          integer(lda), builder.inttoptr(b, fptr), integer(ldb), ir.Constant(f32, 0.0),
                          builder.inttoptr(c, fptr), integer(ldc)])
        return context.get_dummy_value()

    return codegen


_SGEMM_SIGNATURE = types.void(types.int64, types.int64, types.int64, types.int64, types.uint64, types.int64,
                              types.uint64, types.int64, types.uint64, types.int64)


@intrinsic
def _sgemm_ilp64(typingctx, address, m, n, k, a, lda, b, ldb, c, ldc):  # type: ignore[no-untyped-def]
    """cblas_sgemm of an ILP64 OpenBLAS at ``address``: c[m, n] = a[m, k] @ b[k, n] (pointers as uint64)."""
    return _SGEMM_SIGNATURE, _sgemm_codegen(64)


@intrinsic
def _sgemm_lp64(typingctx, address, m, n, k, a, lda, b, ldb, c, ldc):  # type: ignore[no-untyped-def]
    """The same for an LP64 OpenBLAS (32-bit integers)."""
    return _SGEMM_SIGNATURE, _sgemm_codegen(32)


@numba.njit(inline="always", cache=True, nogil=True)
def sgemm(address, ilp64, m, n, k, a, lda, b, ldb, c, ldc):
    """Numba-callable: C = A @ B through the cblas_sgemm at ``address`` (:func:`sgemm_address`); row-major, the
    pointers uint64, the leading dimensions in floats."""
    if ilp64:
        _sgemm_ilp64(address, m, n, k, a, lda, b, ldb, c, ldc)
    else:
        _sgemm_lp64(address, m, n, k, a, lda, b, ldb, c, ldc)


@serial_and_parallel
def _split_kernel(address, ilp64, a0, sa, lda, b0, sb, ldb, c0, sc, ldc, slices, m, n, k, by_rows, chunks):
    """C[x] = A[x] @ B[x] for every slice x < ``slices``: A (M, K), B (K, N), C (M, N) float32 at the addresses
    a0 + x*sa (rows lda apart), b0 + x*sb (ldb), c0 + x*sc (ldc); strides in floats. ``chunks`` chunks in all:
    with slices >= chunks a run of whole slices each, else each slice cut into chunks // slices row blocks
    (``by_rows``) or column blocks of B and C (chunks past the last slice do nothing)."""
    u = np.uint64
    f = u(4)  # bytes per float32
    per_slice = max(1, chunks // slices)
    for chunk in numba.prange(chunks):
        if slices >= chunks:
            x0, x1 = chunk_bounds(chunk, chunks, slices)
            for x in range(x0, x1):
                sgemm(address, ilp64, m, n, k, a0 + u(x * sa) * f, lda, b0 + u(x * sb) * f, ldb,
                       c0 + u(x * sc) * f, ldc)
        else:
            x = chunk // per_slice
            part = chunk % per_slice
            if x >= slices:
                continue
            if by_rows:
                r0, r1 = chunk_bounds(part, per_slice, m)
                if r1 > r0:
                    sgemm(address, ilp64, r1 - r0, n, k, a0 + u(x * sa + r0 * lda) * f, lda, b0 + u(x * sb) * f,
                           ldb, c0 + u(x * sc + r0 * ldc) * f, ldc)
            else:
                j0, j1 = chunk_bounds(part, per_slice, n)
                if j1 > j0:
                    sgemm(address, ilp64, m, j1 - j0, k, a0 + u(x * sa) * f, lda, b0 + u(x * sb + j0) * f, ldb,
                           c0 + u(x * sc + j0) * f, ldc)


def _layout(x: np.ndarray) -> tuple[int, int, int] | None:
    """(address, slice stride, row stride) of a float32 matrix or stack of matrices whose rows are unit-stride
    (strides in floats; a 2-D array's slice stride 0), or None for another layout (negative, non-unit or
    unaligned strides)."""
    if x.dtype != np.float32 or x.ndim not in (2, 3) or x.strides[-1] != 4 and x.shape[-1] > 1:
        return None
    strides = x.strides if x.ndim == 3 else (0, *x.strides)
    if any(st < 0 or st % 4 for st in strides[:2]):
        return None
    row = strides[1] // 4 if x.shape[-2] > 1 else x.shape[-1]
    if row < x.shape[-1]:
        return None
    return x.ctypes.data, strides[0] // 4, max(row, 1)


@functools.cache
def sgemm_address() -> tuple[int, bool] | None:
    """(address of cblas_sgemm, whether its integers are 64-bit) in the OpenBLAS NumPy uses, or None."""
    lib = thread_settings.openblas()
    if lib is None:
        return None
    try:
        handle = ctypes.CDLL(lib.path, mode=thread_settings.NOLOAD_MODE)
    except OSError:
        return None
    for prefix, suffix in thread_settings.SYMBOL_FORMS:
        fn = getattr(handle, f"{prefix}cblas_sgemm{suffix}", None)
        if fn is not None:
            address = ctypes.cast(fn, ctypes.c_void_p).value
            if address:
                return int(address), suffix.startswith("64")
    return None


def available() -> bool:
    """Whether GEMMs can be split over Numba's pool here (an OpenBLAS with cblas_sgemm was found)."""
    return sgemm_address() is not None


def split_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, threads: int, by_rows: bool) -> bool:
    """out = a @ b on ``threads`` threads of Numba's pool, one OpenBLAS call per chunk: a float32 (M, K) or
    (X, M, K), b (K, N) or (X, K, N), out (M, N) or (X, M, N) written in place; each with unit-stride rows (row
    and slice strides free: a column block of a wider matrix is fine), out sharing no memory with a or b.
    2-D: ``threads`` row blocks of a and out (``by_rows``) or column blocks of b and out. A stack: whole slices
    per thread. Returns False, computing nothing, where it cannot run (no cblas_sgemm, fewer than 2 threads, or
    operands of other shapes, dtypes or layouts): the caller then splits the GEMM its own way."""
    found = sgemm_address()
    if found is None or threads < 2 or not (a.ndim == b.ndim == out.ndim):
        return False
    layouts = [_layout(x) for x in (a, b, out)]
    if None in layouts:
        return False
    (a0, sa, lda), (b0, sb, ldb), (c0, sc, ldc) = layouts  # type: ignore[misc]
    slices = a.shape[0] if a.ndim == 3 else 1
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if b.shape != (*a.shape[:-2], k, n) or out.shape != (*a.shape[:-2], m, n) or not (m and n and k and slices):
        return False
    if (slices > 1 and sc < m * ldc) or np.may_share_memory(out, a) or np.may_share_memory(out, b):
        return False  # out's slices overlap (a broadcast), or out overlaps an operand
    address, ilp64 = found
    # work = 1 << 62: the caller decided to split; the kernel pair's own threshold must not undo that.
    _split_kernel(threads, 1 << 62, address, ilp64, a0, sa, lda, b0, sb, ldb, c0, sc, ldc, slices, m, n, k, by_rows,
                  threads)
    return True

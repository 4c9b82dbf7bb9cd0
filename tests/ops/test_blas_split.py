"""GEMMs split over Numba's pool, one OpenBLAS call per chunk (parsicore.kernels.numba_backend.blas_split), against a
float64 reference: every split (row blocks, column blocks, whole slices, slices cut in blocks), more threads than
rows or slices, and the operands it must refuse (leaving ``out`` untouched)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.concurrency import run_in_threads
from tests.strategies import seeded_array

blas_split = pytest.importorskip("parsicore.kernels.numba_backend.blas_split")
if not blas_split.available():
    pytest.skip("no OpenBLAS cblas_sgemm found in this process", allow_module_level=True)

parallel = pytest.importorskip("parsicore.kernels.numba_backend.parallel")


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a.astype(np.float64), b.astype(np.float64))


def check(a: np.ndarray, b: np.ndarray, threads: int, by_rows: bool) -> None:
    want = reference(a, b)
    out = np.full(want.shape, np.nan, dtype=np.float32)
    assert blas_split.split_matmul(a, b, out, threads, by_rows)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * scale * max(1, a.shape[-1]) ** 0.5)


@given(m=st.integers(1, 70), k=st.integers(1, 40), n=st.integers(1, 70), threads=st.integers(2, 5),
       by_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_two_dimensional_split_matches_reference(m: int, k: int, n: int, threads: int, by_rows: bool,
                                                 seed: int) -> None:
    """Row or column blocks; more threads than rows or columns leaves some chunks empty."""
    check(seeded_array(seed, (m, k)), seeded_array(seed + 1, (k, n)), threads, by_rows)


@given(slices=st.integers(1, 40), m=st.integers(1, 20), k=st.integers(1, 20), n=st.integers(1, 30),
       threads=st.integers(2, 5), by_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_stack_split_matches_reference(slices: int, m: int, k: int, n: int, threads: int, by_rows: bool,
                                       seed: int) -> None:
    """A stack (Winograd's 16 or 36 slices): runs of whole slices, or with fewer slices than threads each slice in
    blocks (and chunks past the last slice)."""
    check(seeded_array(seed, (slices, m, k)), seeded_array(seed + 1, (slices, k, n)), threads, by_rows)


@given(m=st.integers(1, 40), k=st.integers(1, 30), n=st.integers(1, 40), pads=st.tuples(*[st.integers(0, 5)] * 3),
       threads=st.integers(2, 4), by_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_strided_rows_match_reference(m: int, k: int, n: int, pads: tuple[int, int, int], threads: int,
                                      by_rows: bool, seed: int) -> None:
    """Operands that are column blocks of wider matrices (rows further apart than their length), as a blocked
    conv's GEMM writes its block of output columns: only those columns of out are written."""
    pa, pb, pc = pads
    a_wide = seeded_array(seed, (m, k + pa))
    b_wide = seeded_array(seed + 1, (k, n + pb))
    a, b = a_wide[:, pa:], b_wide[:, :n]
    out_wide = np.full((m, n + pc), 9.0, dtype=np.float32)
    out = out_wide[:, pc:]
    assert blas_split.split_matmul(a, b, out, threads, by_rows)
    want = reference(a, b)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())) * k**0.5)
    assert (out_wide[:, :pc] == 9.0).all()


def test_strided_stack_matches_reference() -> None:
    """Slices further apart than a slice (views of a larger stack)."""
    a = seeded_array(5, (6, 7, 9))[::2, :, 1:]  # 3 slices, slice stride 2 slices, rows 9 apart
    b = seeded_array(6, (3, 8, 5))
    out_big = np.full((3, 7, 6), 9.0, dtype=np.float32)
    out = out_big[:, :, :5]
    assert blas_split.split_matmul(a, b, out, 2, False)
    np.testing.assert_allclose(out, reference(a, b), rtol=1e-4, atol=1e-4)
    assert (out_big[:, :, 5] == 9.0).all()


def test_split_runs_the_parallel_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller decided to split: the kernel pair's own work threshold must not send it to the serial build."""
    calls: list[str] = []
    pair = blas_split._split_kernel
    for build in ("serial", "parallel"):
        original = getattr(pair, build)
        monkeypatch.setattr(pair, build, lambda *args, b=build, f=original: (calls.append(b), f(*args))[1])
    monkeypatch.setattr(parallel, "MIN_PARALLEL_WORK", 1 << 40)
    a, b = seeded_array(1, (8, 4)), seeded_array(2, (4, 6))
    out = np.empty((8, 6), np.float32)
    assert blas_split.split_matmul(a, b, out, 2, True)
    assert calls == ["parallel"]
    np.testing.assert_allclose(out, reference(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["transposed", "float64", "mismatched", "empty", "one thread", "1-d",
                                  "reversed rows", "out overlaps a", "broadcast out slices"])
def test_refused_operands_leave_out_untouched(case: str) -> None:
    a, b = seeded_array(3, (6, 5)), seeded_array(4, (5, 7))
    out = np.full((6, 7), 7.0, dtype=np.float32)
    threads = 2
    if case == "transposed":
        a = np.asfortranarray(a)
    elif case == "float64":
        b = b.astype(np.float64)
    elif case == "mismatched":
        b = seeded_array(4, (4, 7))
    elif case == "empty":
        a, b, out = a[:, :0], b[:0], out
    elif case == "one thread":
        threads = 1
    elif case == "reversed rows":
        a = a[::-1]
    elif case == "out overlaps a":
        shared = np.full((6, 12), 7.0, dtype=np.float32)
        a, b, out = shared[:, :5], seeded_array(4, (5, 7)), shared[:, 5:]
        a[:] = seeded_array(3, (6, 5))
        before = shared.copy()
        assert not blas_split.split_matmul(a, b, out, threads, True)
        assert (shared == before).all()
        return
    elif case == "broadcast out slices":
        a, b = seeded_array(3, (2, 6, 5)), seeded_array(4, (2, 5, 7))
        out = np.broadcast_to(np.full((1, 6, 7), 7.0, dtype=np.float32), (2, 6, 7))
    else:
        a, b, out = a[0], b, out[0]
    assert not blas_split.split_matmul(a, b, out, threads, True)
    assert (out == 7.0).all()


def test_concurrent_callers_get_their_own_results() -> None:
    """Callers in several Python threads at once (one takes the pool, the others the serial build)."""
    cases = [(seeded_array(10 + i, (40, 30)), seeded_array(20 + i, (30, 50))) for i in range(4)]
    wants = [reference(a, b) for a, b in cases]

    def worker(t: int) -> None:
        a, b = cases[t]
        out = np.empty((40, 50), dtype=np.float32)
        for _ in range(30):
            assert blas_split.split_matmul(a, b, out, 2, t % 2 == 0)
            np.testing.assert_allclose(out, wants[t], rtol=1e-4, atol=1e-4)

    run_in_threads(worker, 4)

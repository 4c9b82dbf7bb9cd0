"""parsicore.threads: OpenBLAS found through ctypes, one thread setting for BLAS and Numba, wait policy."""

from __future__ import annotations

import numpy as np
import pytest

import parsicore
from parsicore import threads
from tests.concurrency import run_in_threads
from tests.models import small_cnn
from tests.strategies import seeded_array


@pytest.mark.parametrize("machine, wanted", [("x86_64", {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)}),
                                             ("AMD64", {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)}),
                                             ("aarch64", {"OMP_WAIT_POLICY": "PASSIVE"}),
                                             ("armv7l", {"OMP_WAIT_POLICY": "PASSIVE"})])
def test_prepare_environment_sets_only_what_the_user_has_not(machine: str, wanted: dict[str, str]) -> None:
    """A bounded spin on x86-64 (where it was measured), sleeping threads elsewhere; a policy the user chose, with
    either of libgomp's variables, stays."""
    env: dict[str, str] = {}
    assert threads.prepare_environment(env, machine) == wanted
    assert env == wanted
    assert threads.threads_spin(env) is ("GOMP_SPINCOUNT" in wanted)
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": ""}):
        env = dict(chosen)
        assert threads.prepare_environment(env, machine) == {}
        assert env == chosen


@pytest.mark.parametrize("env, spins", [
    ({}, True),  # libgomp's default: 300000 spins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    ({"OMP_WAIT_POLICY": " passive "}, False),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, True),
    ({"GOMP_SPINCOUNT": "30000"}, True),
    ({"GOMP_SPINCOUNT": "0"}, False),
    ({"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "ACTIVE"}, False),  # the count wins, as in libgomp
    ({"GOMP_SPINCOUNT": "30k", "OMP_WAIT_POLICY": "PASSIVE"}, True),
    ({"GOMP_SPINCOUNT": "infinite"}, True),
    ({"GOMP_SPINCOUNT": "lots", "OMP_WAIT_POLICY": "PASSIVE"}, False),  # rejected by libgomp: the policy decides
])
def test_threads_spin_reads_the_environment_as_libgomp_does(env: dict[str, str], spins: bool) -> None:
    assert threads.threads_spin(env) is spins


def test_unloadable_or_foreign_libraries_are_not_bound(tmp_path) -> None:
    assert threads._bind(str(tmp_path / "libopenblas-missing.so")) is None
    assert threads._first_bound([str(tmp_path / "nope.so")]) is None
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm:
        assert threads._bind(libm) is None  # loaded, but exports no openblas_* symbols


def test_blas_info_is_one_line() -> None:
    info = threads.blas_info()
    assert "\n" not in info and info


@pytest.fixture
def blas() -> threads.BlasLibrary:
    lib = threads.openblas()
    if lib is None:
        pytest.skip("NumPy here does not use a findable OpenBLAS")
    return lib


def test_apply_pins_openblas_to_one_thread(blas: threads.BlasLibrary) -> None:
    """parsicore splits GEMMs itself; OpenBLAS runs each piece on the calling thread."""
    before = blas.get_num_threads()
    try:
        blas.set_num_threads(2)
        threads.apply(2)
        assert threads.blas_threads() == 1
    finally:
        blas.set_num_threads(before)


def test_model_threads_set_the_context_and_pin_blas(blas: threads.BlasLibrary) -> None:
    before = blas.get_num_threads()
    x = seeded_array(0, (1, 1, 28, 28))
    try:
        blas.set_num_threads(2)
        one = parsicore.load(small_cnn(0).build(), backend="numpy", threads=1)
        two = parsicore.load(small_cnn(0).build(), backend="numpy", threads=2)
        default = parsicore.load(small_cnn(0).build(), backend="numpy")
        a, b, c = one(x), two(x), default(x)
        assert threads.blas_threads() == 1
        assert (one.plan.context.threads, two.plan.context.threads) == (1, 2)
        assert default.plan.context.threads == threads.default_threads()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    finally:
        blas.set_num_threads(before)


def test_default_threads_from_environment() -> None:
    assert threads.default_threads({"PARSICORE_THREADS": "3", "NUMBA_NUM_THREADS": "5"}) == 3
    assert threads.default_threads({"NUMBA_NUM_THREADS": "5"}) == 5
    assert threads.default_threads({"PARSICORE_THREADS": "x"}) >= 1


@pytest.mark.parametrize("count", [0, 1, 2, 7, 64])
@pytest.mark.parametrize("n_threads", [1, 2, 4])
def test_run_chunks_runs_every_chunk_once(count: int, n_threads: int) -> None:
    import threading

    seen: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        with lock:
            seen.append(i)

    threads.run_chunks(task, count, n_threads)
    assert sorted(seen) == list(range(count))


def test_run_chunks_reraises_a_chunk_error() -> None:
    def task(i: int) -> None:
        if i == 3:
            raise ValueError("chunk 3")

    with pytest.raises(ValueError, match="chunk 3"):
        threads.run_chunks(task, 8, 2)


def test_run_chunks_from_many_callers_at_once() -> None:
    """Several Python threads share the helpers; each caller's job completes with its own results."""
    results: dict[int, list[int]] = {}

    def caller(k: int) -> None:
        for _ in range(50):
            out = [0] * 16
            threads.run_chunks(lambda i, out=out: out.__setitem__(i, i * k), 16, 3)
            assert out == [i * k for i in range(16)]
        results[k] = out

    run_in_threads(caller, 4)
    assert len(results) == 4


def test_single_threaded_numba_run_matches_default() -> None:
    pytest.importorskip("numba")
    x = seeded_array(1, (2, 1, 28, 28))
    one = parsicore.load(small_cnn(1).build(), backend="numba", threads=1)
    default = parsicore.load(small_cnn(1).build(), backend="numba")
    np.testing.assert_allclose(one(x), default(x), rtol=1e-5, atol=1e-6)
    assert one.plan.context.threads == 1

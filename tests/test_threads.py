"""parsicore.threads: OpenBLAS found through ctypes, one thread setting for BLAS and Numba, wait policy."""

from __future__ import annotations

import numpy as np
import pytest

import parsicore
from parsicore import threads
from tests.models import small_cnn
from tests.strategies import seeded_array


def test_prepare_environment_sets_only_what_the_user_has_not() -> None:
    env: dict[str, str] = {}
    assert threads.prepare_environment(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prepare_environment(env) == {}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


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


def test_apply_sets_openblas_threads(blas: threads.BlasLibrary) -> None:
    before = blas.get_num_threads()
    try:
        threads.apply(1)
        assert threads.blas_threads() == 1
        threads.apply(2)
        assert threads.blas_threads() == 2
    finally:
        blas.set_num_threads(before)


def test_model_threads_govern_blas(blas: threads.BlasLibrary) -> None:
    before = blas.get_num_threads()
    x = seeded_array(0, (1, 1, 28, 28))
    try:
        one = parsicore.load(small_cnn(0).build(), backend="numpy", threads=1)
        two = parsicore.load(small_cnn(0).build(), backend="numpy", threads=2)
        a = one(x)
        assert threads.blas_threads() == 1
        b = two(x)
        assert threads.blas_threads() == 2
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    finally:
        blas.set_num_threads(before)


def test_single_threaded_numba_run_matches_default() -> None:
    pytest.importorskip("numba")
    x = seeded_array(1, (2, 1, 28, 28))
    one = parsicore.load(small_cnn(1).build(), backend="numba", threads=1)
    default = parsicore.load(small_cnn(1).build(), backend="numba")
    np.testing.assert_allclose(one(x), default(x), rtol=1e-5, atol=1e-6)
    assert one.plan.context.threads == 1

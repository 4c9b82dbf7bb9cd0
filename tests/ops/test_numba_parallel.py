"""The parallel builds of the numba kernels against the naive reference.

Every numba kernel with a parallel loop is compiled twice (parsicore.kernels.numba_backend.parallel); the
other test modules exercise the serial builds (their cases are below the work threshold). Here the
threshold is 0, so every call takes the parallel build: each conv path, dense and gated, and pooling.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.ops.base import NoAttrs
from parsicore.ops.pool import AveragePoolOp, GlobalAveragePoolOp, GlobalMaxPoolOp, MaxPoolOp
from tests.ops._strategies_conv import (
    channel_lists,
    conv_cases,
    depthwise_cases,
    pool_cases,
    winograd_cases,
    winograd_tile,
)
from tests.ops.test_conv import assert_close, expected, run_kernel, zero_inactive
from tests.ops.test_pool import run_kernel as run_pool
from tests.strategies import seeded_array

parallel = pytest.importorskip("parsicore.kernels.numba_backend.parallel")


@pytest.fixture(autouse=True)
def _always_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_PARALLEL_WORK", 0)


@pytest.mark.parametrize("path", ["im2col_gemm", "gemm_1x1", "grouped", "depthwise"])
@given(data=st.data())
def test_conv_parallel_build_matches_reference(path: str, data: st.DataObject) -> None:
    case = data.draw(conv_cases(path))
    n = case.x.shape[0]
    active_out = data.draw(st.one_of(st.none(), channel_lists(case.out_shape[0], n)))
    active_in = data.draw(st.one_of(st.none(), channel_lists(case.in_shape[0], n)))
    x = case.x if active_in is None else zero_inactive(case.x, active_in, fill=np.nan)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(run_kernel("numba", case, x, active_out=active_out, active_in=active_in), want, scale)


@given(case=depthwise_cases(min_pixels=65))
def test_conv_depthwise_planes_parallel_build_matches_reference(case) -> None:
    want, scale = expected(case)
    assert_close(run_kernel("numba", case), want, scale)


@pytest.mark.parametrize("pad_one", [False, True])
@given(data=st.data())
def test_conv_depthwise_3x3_parallel_build_matches_reference(pad_one: bool, data: st.DataObject) -> None:
    """The 3x3 kernels' chunks of channels on the pool's threads, dense and gated (pad_one: the flat kernel's
    cases)."""
    case = data.draw(depthwise_cases(taps3x3=True, pad_one=pad_one))
    n, c = case.x.shape[:2]
    active_out = data.draw(st.one_of(st.none(), channel_lists(c, n)))
    active_in = data.draw(st.one_of(st.none(), channel_lists(c, n)))
    x = case.x if active_in is None else zero_inactive(case.x, active_in, fill=np.nan)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(run_kernel("numba", case, x, active_out=active_out, active_in=active_in), want, scale)


@pytest.mark.parametrize("tile", [2, 4])
@given(data=st.data())
def test_conv_winograd_parallel_build_matches_reference(tile: int, data: st.DataObject) -> None:
    case = data.draw(winograd_cases())
    n = case.x.shape[0]
    active_out = data.draw(st.one_of(st.none(), channel_lists(case.out_shape[0], n)))
    active_in = data.draw(st.one_of(st.none(), channel_lists(case.in_shape[0], n)))
    x = case.x if active_in is None else zero_inactive(case.x, active_in, fill=np.nan)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    with winograd_tile(tile):
        got = run_kernel("numba", case, x, active_out=active_out, active_in=active_in)
    assert_close(got, want, scale)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@given(data=st.data())
def test_pool_parallel_build_matches_reference(op: str, data: st.DataObject) -> None:
    case = data.draw(pool_cases(op))
    reference = MaxPoolOp() if op == "MaxPool" else AveragePoolOp()
    (want,) = reference.reference(case.attrs, [case.x], {})
    np.testing.assert_allclose(run_pool("numba", op, case.attrs, case.x, case.out_shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@given(seed=st.integers(0, 2**16), shape=st.tuples(st.integers(1, 3), st.integers(1, 16), st.integers(1, 9),
                                                   st.integers(1, 9)))
def test_global_pool_parallel_build_matches_reference(op: str, seed: int, shape: tuple[int, int, int, int]) -> None:
    x = seeded_array(seed, shape)
    reference = GlobalMaxPoolOp() if op == "GlobalMaxPool" else GlobalAveragePoolOp()
    (want,) = reference.reference(NoAttrs(), [x], {})
    got = run_pool("numba", op, NoAttrs(), x, (shape[1], 1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

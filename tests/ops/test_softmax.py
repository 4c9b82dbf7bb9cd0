"""Softmax: numpy kernel vs reference, normalisation, stability, a float64 math.exp reference, axis errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.numpy_backend.softmax import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import parse_attrs
from parsicore.ops.softmax import SoftmaxAttrs
from tests.ops._strategies_misc import (
    attrs_of,
    batched_input,
    batches,
    feature_shapes,
    reference,
    run_kernel,
    seeds,
    strided,
)


@st.composite
def softmax_cases(draw: st.DrawFn) -> tuple[tuple[int, ...], int]:
    """(feature shape, axis) with axis in 1..rank or its negative form."""
    shape = draw(feature_shapes(min_rank=1, max_rank=3, max_side=5))
    axis = draw(st.integers(1, len(shape)))
    if draw(st.booleans()):
        axis -= len(shape) + 1
    return shape, axis


def softmax_math(x: np.ndarray, axis: int) -> np.ndarray:
    """Scalar float64 softmax with math.exp along ``axis`` (positive), one slice at a time."""
    moved = np.moveaxis(x.astype(np.float64), axis, -1)
    out = np.empty_like(moved)
    for index in np.ndindex(*moved.shape[:-1]):
        row = [float(v) for v in moved[index]]
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        total = math.fsum(exps)
        out[index] = [e / total for e in exps]
    return np.moveaxis(out, -1, axis)


@given(seeds, batches, softmax_cases(), st.sampled_from([1.0, 10.0, 1000.0]), strided)
def test_numpy_kernel_matches_reference(seed: int, n: int, case: tuple, scale: float, flag: bool) -> None:
    shape, axis = case
    x = batched_input(seed, n, shape, flag, scale=scale)
    attrs = attrs_of("Softmax", axis=axis)
    (got,) = run_kernel(FACTORIES, "Softmax", attrs, [x])
    (want,) = reference("Softmax", attrs, [x])
    positive_axis = axis % (len(shape) + 1)
    np.testing.assert_allclose(want, softmax_math(x, positive_axis), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got)) and np.all(got >= 0.0)
    np.testing.assert_allclose(got.sum(axis=positive_axis), 1.0, rtol=1e-5)


@pytest.mark.filterwarnings("error")
def test_huge_logits_do_not_overflow() -> None:
    x = np.float32([[1e30, 1e30, -1e30], [-3e38, 0.0, 3e38]])
    (got,) = run_kernel(FACTORIES, "Softmax", SoftmaxAttrs(), [x])
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize(("shape", "axis"), [((5,), 2), ((5,), -2), ((3, 4), 3), ((3, 4), -3)])
def test_axis_out_of_range_raises_value_error(shape: tuple, axis: int) -> None:
    attrs = attrs_of("Softmax", axis=axis)
    with pytest.raises(ValueError):
        OPS["Softmax"].infer(attrs, [shape], {})


@pytest.mark.parametrize("raw", [{"axis": 0}, {"axis": 1.5}, {"axis": True}, {"dim": 1}])
def test_bad_attributes_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(SoftmaxAttrs, raw)

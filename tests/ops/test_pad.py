"""Constant Pad: numpy kernel vs reference vs np.pad, shape rules, attribute errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.numpy_backend.pad import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import parse_attrs
from parsicore.ops.pad import PadAttrs
from tests.ops._strategies_misc import (
    attrs_of,
    batched_input,
    batches,
    image_shapes,
    reference,
    run_kernel,
    seeds,
    strided,
)

pads = st.tuples(*[st.integers(0, 3)] * 4)
values = st.sampled_from([0.0, -1.5, 3.25])


@given(seeds, batches, image_shapes(), pads, values, strided)
def test_numpy_kernel_matches_reference(seed: int, n: int, shape: tuple[int, int, int],
                                        pad: tuple[int, int, int, int], value: float, flag: bool) -> None:
    x = batched_input(seed, n, shape, flag)
    attrs = attrs_of("Pad", pads=list(pad), value=value)
    (got,) = run_kernel(FACTORIES, "Pad", attrs, [x])
    (want,) = reference("Pad", attrs, [x])
    top, left, bottom, right = pad
    np.testing.assert_array_equal(want, np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                                               constant_values=value))
    np.testing.assert_array_equal(got, want)


def test_infer_and_keeps_zero() -> None:
    op = OPS["Pad"]
    assert op.infer(attrs_of("Pad", pads=[1, 2, 3, 4]), [(5, 6, 7)], {}) == [(5, 10, 13)]
    assert op.channelwise and not op.keeps_zero
    assert op.keeps_zero_for(attrs_of("Pad", pads=[1, 1, 1, 1]))
    assert not op.keeps_zero_for(attrs_of("Pad", pads=[1, 1, 1, 1], value=1.0))
    with pytest.raises(ValueError):
        op.infer(PadAttrs(), [(5, 6)], {})


@pytest.mark.parametrize(
    "raw",
    [{"pads": [1, 1, 1, -1]}, {"pads": [1, 1, 1]}, {"pads": [1, 1, 1, 1, 0, 0]}, {"pads": [1, 1, 1, 1.5]},
     {"pads": 1}, {"value": "0"}, {"mode": "reflect"}],
)
def test_bad_attributes_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(PadAttrs, raw)

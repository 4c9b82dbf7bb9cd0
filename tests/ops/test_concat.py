"""Concat on channels: numpy kernel vs reference, shape rules, attribute errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.numpy_backend.concat import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import parse_attrs
from parsicore.ops.concat import ConcatAttrs
from tests.ops._strategies_misc import batched_input, batches, reference, run_kernel, seeds

rest_shapes = st.sampled_from([(), (1, 1), (3, 2), (1, 4)])  # () = vectors (N, C)


@given(seeds, batches, rest_shapes, st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1, max_size=5))
def test_numpy_kernel_matches_reference(seed: int, n: int, rest: tuple[int, ...],
                                        parts: list[tuple[int, bool]]) -> None:
    inputs = [batched_input(seed + i, n, (c, *rest), flag) for i, (c, flag) in enumerate(parts)]
    (got,) = run_kernel(FACTORIES, "Concat", ConcatAttrs(), inputs)
    (want,) = reference("Concat", ConcatAttrs(), inputs)
    np.testing.assert_array_equal(got, want)
    # Channel offsets: input i's channels start after the channels of the inputs before it.
    offset = 0
    for x in inputs:
        np.testing.assert_array_equal(want[:, offset:offset + x.shape[1]], x)
        offset += x.shape[1]


def test_sixty_four_inputs_and_no_more() -> None:
    op = OPS["Concat"]
    assert op.num_inputs == (1, 64)
    assert op.infer(ConcatAttrs(), [(1, 2, 2)] * 64, {}) == [(64, 2, 2)]
    with pytest.raises(ValueError):
        op.infer(ConcatAttrs(), [(1, 2, 2)] * 65, {})
    inputs = [np.full((2, 1, 2, 2), i, dtype=np.float32) for i in range(64)]
    (got,) = run_kernel(FACTORIES, "Concat", ConcatAttrs(), inputs)
    np.testing.assert_array_equal(got[:, :, 0, 0], np.tile(np.arange(64, dtype=np.float32), (2, 1)))


@pytest.mark.parametrize("in_shapes", [[(2, 3, 3), (2, 3, 4)], [(2, 3, 3), (2, 9)], [(2,), (2, 1, 1)], [()]])
def test_infer_rejects_mismatched_inputs(in_shapes: list) -> None:
    with pytest.raises(ValueError):
        OPS["Concat"].infer(ConcatAttrs(), in_shapes, {})


@pytest.mark.parametrize("raw", [{"axis": 0}, {"axis": 2}, {"axis": -3}, {"axis": 1.0}, {"dim": 1}])
def test_bad_attributes_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(ConcatAttrs, raw)

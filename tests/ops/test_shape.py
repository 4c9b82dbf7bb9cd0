"""Flatten, Reshape, Identity, Dropout: numpy kernels vs references, shape rules and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.numpy_backend.shape import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import NoAttrs, parse_attrs
from parsicore.ops.shape import DropoutAttrs, FlattenAttrs, ReshapeAttrs
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
def reshape_cases(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(source, target attribute, resolved target): the target is a factorisation of the size, maybe with -1."""
    source = draw(feature_shapes(min_rank=1, max_rank=4, max_side=4))
    size = math.prod(source)
    target = []
    rest = size
    for _ in range(draw(st.integers(0, 3))):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        d = draw(st.sampled_from(divisors))
        target.append(d)
        rest //= d
    target.append(rest)
    target = draw(st.permutations(target))
    resolved = tuple(target)
    if draw(st.booleans()):
        target[draw(st.integers(0, len(target) - 1))] = -1
    return source, tuple(target), resolved


@given(seeds, batches, reshape_cases(), strided)
def test_reshape_numpy_kernel_matches_reference(seed: int, n: int, case: tuple, flag: bool) -> None:
    source, target, resolved = case
    x = batched_input(seed, n, source, flag)
    attrs = attrs_of("Reshape", shape=list(target))
    assert OPS["Reshape"].infer(attrs, [source], {}) == [resolved]
    (got,) = run_kernel(FACTORIES, "Reshape", attrs, [x])
    (want,) = reference("Reshape", attrs, [x])
    np.testing.assert_array_equal(want, np.ascontiguousarray(x).reshape(n, *resolved))
    np.testing.assert_array_equal(got, want)


@given(st.sampled_from(["Flatten", "Identity", "Dropout"]), seeds, batches, feature_shapes(max_rank=4), strided)
def test_copy_ops_numpy_kernel_matches_reference(op_type: str, seed: int, n: int, shape: tuple[int, ...],
                                                 flag: bool) -> None:
    x = batched_input(seed, n, shape, flag)
    attrs = attrs_of(op_type)
    (got,) = run_kernel(FACTORIES, op_type, attrs, [x])
    (want,) = reference(op_type, attrs, [x])
    independent = x.reshape(n, -1) if op_type == "Flatten" else x
    np.testing.assert_array_equal(want, independent)
    np.testing.assert_array_equal(got, want)


def test_flatten_infer() -> None:
    assert OPS["Flatten"].infer(FlattenAttrs(), [(3, 4, 5)], {}) == [(60,)]
    assert OPS["Flatten"].infer(FlattenAttrs(), [(7,)], {}) == [(7,)]
    assert OPS["Identity"].channelwise and OPS["Identity"].keeps_zero
    assert OPS["Dropout"].channelwise and OPS["Dropout"].keeps_zero
    assert not OPS["Flatten"].channelwise and not OPS["Reshape"].channelwise


@pytest.mark.parametrize(
    ("source", "target"),
    [((3, 4, 5), (7, -1)), ((3, 4, 5), (3, 4, 6)), ((3, 4, 5), (61,)), ((2, 2), (3, -1))],
)
def test_reshape_size_mismatch_raises_value_error(source: tuple, target: tuple) -> None:
    attrs = attrs_of("Reshape", shape=list(target))
    with pytest.raises(ValueError):
        OPS["Reshape"].infer(attrs, [source], {})


@pytest.mark.parametrize(
    ("op_type", "raw"),
    [
        ("Reshape", {}),  # no target shape
        ("Reshape", {"shape": [-1, -1]}),
        ("Reshape", {"shape": [0, 4]}),  # ONNX's "copy this dim" is not supported
        ("Reshape", {"shape": [-2, 4]}),
        ("Reshape", {"shape": "3,4"}),
        ("Reshape", {"shape": [3.0, 4]}),
        ("Reshape", {"allowzero": 1}),
        ("Flatten", {"axis": 0}),
        ("Flatten", {"axis": 2}),
        ("Flatten", {"axis": "1"}),
        ("Dropout", {"ratio": 1.0}),
        ("Dropout", {"ratio": -0.1}),
        ("Dropout", {"p": 0.5}),
        ("Identity", {"x": 1}),
    ],
)
def test_bad_attributes_raise_value_error(op_type: str, raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(OPS[op_type].attrs, raw)


def test_attribute_classes() -> None:
    assert OPS["Reshape"].attrs is ReshapeAttrs
    assert OPS["Dropout"].attrs is DropoutAttrs and DropoutAttrs().ratio == 0.5
    assert OPS["Identity"].attrs is NoAttrs

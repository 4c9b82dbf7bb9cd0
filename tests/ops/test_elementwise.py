"""Add and Mul: numpy kernels vs references, broadcasting rules on feature shapes, shape errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels import factories, numba_available
from parsicore.kernels.base import ACTIVATION_KINDS, Activation, apply_activation
from parsicore.kernels.numpy_backend.elementwise import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import NoAttrs, parse_attrs
from tests.ops._strategies_conv import activation_of_kind
from tests.ops._strategies_misc import batched_input, batches, feature_shapes, reference, run_kernel, seeds, strided
from tests.strategies import maybe_non_contiguous, seeded_array

ops = st.sampled_from(["Add", "Mul"])


@st.composite
def broadcast_pairs(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A, B): B broadcasts to A by NumPy rules without enlarging it (leading dims dropped, others 1 or equal)."""
    a = draw(feature_shapes(min_rank=1, max_rank=4, max_side=4))
    drop = draw(st.integers(0, len(a)))
    b = tuple(1 if draw(st.booleans()) else d for d in a[drop:])
    return a, b


def expected(op_type: str, a: np.ndarray, b: np.ndarray, batched_b: bool) -> np.ndarray:
    """Image by image, so NumPy broadcasts feature shapes only (no batch alignment to get wrong)."""
    fn = np.add if op_type == "Add" else np.multiply
    return np.stack([fn(a[i].astype(np.float64), (b[i] if batched_b else b).astype(np.float64))
                     for i in range(a.shape[0])]).astype(np.float32)


@given(ops, seeds, batches, broadcast_pairs(), strided, strided)
def test_two_inputs_numpy_kernel_matches_reference(op_type: str, seed: int, n: int, shapes: tuple,
                                                   flag_a: bool, flag_b: bool) -> None:
    a_shape, b_shape = shapes
    a = batched_input(seed, n, a_shape, flag_a)
    b = batched_input(seed + 1, n, b_shape, flag_b)
    (got,) = run_kernel(FACTORIES, op_type, NoAttrs(), [a, b])
    (want,) = reference(op_type, NoAttrs(), [a, b])
    np.testing.assert_allclose(want, expected(op_type, a, b, True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@given(ops, seeds, batches, broadcast_pairs(), strided)
def test_constant_numpy_kernel_matches_reference(op_type: str, seed: int, n: int, shapes: tuple, flag: bool) -> None:
    a_shape, c_shape = shapes
    a = batched_input(seed, n, a_shape, flag)
    weights = {"constant": seeded_array(seed + 1, c_shape)}
    (got,) = run_kernel(FACTORIES, op_type, NoAttrs(), [a], weights)
    (want,) = reference(op_type, NoAttrs(), [a], weights)
    np.testing.assert_allclose(want, expected(op_type, a, weights["constant"], False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_per_channel_second_input_pairs_batches_with_batches() -> None:
    """(N, C, 1, 1) against (N, C, H, W) with N == W: a plain right-aligned NumPy broadcast would be wrong."""
    a = np.zeros((3, 2, 4, 3), dtype=np.float32)
    b = np.arange(6, dtype=np.float32).reshape(3, 2, 1, 1)
    (got,) = run_kernel(FACTORIES, "Add", NoAttrs(), [a, b])
    for i in range(3):
        for c in range(2):
            assert np.all(got[i, c] == b[i, c, 0, 0])
    b_vector = np.arange(9, dtype=np.float32).reshape(3, 3)  # (N, W): broadcast along W per image
    (got,) = run_kernel(FACTORIES, "Mul", NoAttrs(), [a + 1.0, b_vector])
    for i in range(3):
        assert np.all(got[i] == b_vector[i])


def test_fused_activation_runs_after_the_add() -> None:
    a = maybe_non_contiguous(np.float32([[-1.0, 2.0, -3.0]]), True)
    b = np.float32([[0.5, 0.5, 0.5]])
    (got,) = run_kernel(FACTORIES, "Add", NoAttrs(), [a, b], activation=Activation("relu"))
    np.testing.assert_array_equal(got, [[0.0, 2.5, 0.0]])


needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
@given(ops, seeds, batches, feature_shapes(min_rank=1, max_rank=4, max_side=9), strided, strided, st.data())
def test_numba_same_shape_kernel_with_activation_matches_reference(kind: str, op_type: str, seed: int, n: int,
                                                                   shape: tuple, flag_a: bool, flag_b: bool,
                                                                   data: st.DataObject) -> None:
    """A residual Add and its ReLU (or any fused kind) in one pass; non-contiguous views take NumPy's path."""
    a = batched_input(seed, n, shape, flag_a, scale=6.0)  # spread over the activations' bends
    b = batched_input(seed + 1, n, shape, flag_b, scale=6.0)
    act = data.draw(activation_of_kind(kind))
    (got,) = run_kernel(factories("numba"), op_type, NoAttrs(), [a, b], activation=act)
    (want,) = reference(op_type, NoAttrs(), [a, b])
    np.testing.assert_allclose(want, expected(op_type, a, b, True), rtol=1e-6, atol=1e-6)
    apply_activation(want, act)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("op_type", ["Add", "Mul"])
@pytest.mark.parametrize("act", [None, Activation("relu"), Activation("clip", lo=0.0, hi=6.0)])
def test_numba_same_shape_kernel_passes_nan_and_inf_as_numpy(op_type: str, act: Activation | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN stays NaN through the clamps, +-inf is clamped, and past one L1 block (4096 values) every value is
    written: the same tensor as NumPy's ufunc and apply_activation (from the numba kernel when fused)."""
    from parsicore.kernels.numba_backend import elementwise as numba_elementwise

    calls = []
    kernel = numba_elementwise.binary_activation
    monkeypatch.setattr(numba_elementwise, "binary_activation", lambda *args: calls.append(1) or kernel(*args))
    BLOCK = numba_elementwise.BLOCK  # noqa: N806

    rng = np.random.default_rng(5)
    a = (rng.standard_normal((2, 3, BLOCK // 3 + 7)) * 8).astype(np.float32)
    b = (rng.standard_normal(a.shape) * 8).astype(np.float32)
    a[0, 0, :4] = [np.nan, np.inf, -np.inf, 7.0]
    b[1, 2, -3:] = [np.nan, -np.inf, np.inf]
    (got,) = run_kernel(factories("numba"), op_type, NoAttrs(), [a, b], activation=act)
    with np.errstate(invalid="ignore"):
        want = (np.add if op_type == "Add" else np.multiply)(a, b)
        apply_activation(want, act)
    np.testing.assert_array_equal(got, want)
    assert len(calls) == (act is not None)


@needs_numba
def test_numba_backend_takes_its_kernel_only_for_same_shape_fused_calls() -> None:
    """Broadcast second inputs, constants and a lone sum stay with NumPy (as fast there: module docstring)."""
    from parsicore.kernels.base import KernelSpec

    relu = Activation("relu")

    def code_of(table: dict, shapes: tuple, act: Activation | None, weights: dict | None = None) -> object:
        return table["Add"](KernelSpec("Add", NoAttrs(), weights or {}, shapes, (shapes[0],), act)).__code__

    same = ((4, 5, 5), (4, 5, 5))
    numpy_code = code_of(FACTORIES, same, relu)
    assert code_of(factories("numba"), same, relu) is not numpy_code
    for shapes, act, weights in [(((4, 5, 5), (4, 1, 1)), relu, None), (same, None, None),
                                 (((4, 5, 5),), relu, {"constant": np.ones((4, 1, 1), np.float32)})]:
        assert code_of(factories("numba"), shapes, act, weights) is numpy_code


@pytest.mark.parametrize("op_type", ["Add", "Mul"])
@pytest.mark.parametrize(
    ("in_shapes", "weights"),
    [
        ([(3, 4, 5), (3, 4, 6)], {}),  # incompatible
        ([(3, 1, 1), (3, 4, 5)], {}),  # the second input would enlarge the first
        ([(4, 5), (1, 4, 5)], {}),  # more dimensions than the first
        ([(3, 4, 5)], {}),  # one input without 'constant'
        ([(3, 4, 5)], {"constant": (2, 1, 1)}),
        ([(3, 4, 5)], {"constant": (1, 3, 1, 1)}),  # a batch dim on the constant enlarges the output
        ([(3, 4, 5), (3, 1, 1)], {"constant": (1,)}),  # 'constant' only goes with one input
    ],
)
def test_infer_rejects_bad_shapes(op_type: str, in_shapes: list, weights: dict) -> None:
    with pytest.raises(ValueError):
        OPS[op_type].infer(NoAttrs(), in_shapes, weights)


@pytest.mark.parametrize("op_type", ["Add", "Mul"])
def test_infer_and_macs(op_type: str) -> None:
    op = OPS[op_type]
    assert op.infer(NoAttrs(), [(3, 4, 5), (3, 1, 1)], {}) == [(3, 4, 5)]
    assert op.infer(NoAttrs(), [(3, 4, 5), (5,)], {}) == [(3, 4, 5)]
    assert op.infer(NoAttrs(), [(3, 4, 5)], {"constant": (1, 1, 1)}) == [(3, 4, 5)]
    assert op.num_inputs == (1, 2) and not op.channelwise
    assert op.macs(NoAttrs(), [(3, 4, 5)], [(3, 4, 5)], {}) == (60 if op_type == "Mul" else 0)


@pytest.mark.parametrize("op_type", ["Add", "Mul"])
def test_attributes_are_refused(op_type: str) -> None:
    with pytest.raises(ValueError):
        parse_attrs(OPS[op_type].attrs, {"broadcast": 1})

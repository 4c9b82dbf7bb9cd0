"""Activations: numpy kernels and the fused epilogue (apply_activation) against the float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.base import Activation, apply_activation
from parsicore.kernels.base import keeps_zero as activation_keeps_zero
from parsicore.kernels.numpy_backend.activation import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.activation import OPS as ACTIVATION_OPS
from parsicore.ops.base import Attrs, parse_attrs
from tests.ops._strategies_misc import attrs_of, batches, feature_shapes, reference, run_kernel, seeds, strided
from tests.strategies import float32_arrays, maybe_non_contiguous

TYPES = [op.type for op in ACTIVATION_OPS]
finite = st.floats(-8.0, 8.0, allow_nan=False, width=32)


@st.composite
def activation_attrs(draw: st.DrawFn, op_type: str) -> Attrs:
    """Random valid attributes for ``op_type`` (defaults for ops without attributes)."""
    if op_type == "Clip":
        lo, hi = sorted((draw(finite), draw(finite)))
        return attrs_of("Clip", lo=lo, hi=hi)
    if op_type == "LeakyRelu":
        return attrs_of("LeakyRelu", alpha=draw(st.floats(-2.0, 2.0, width=32)))
    if op_type == "HardSigmoid":
        return attrs_of("HardSigmoid", alpha=draw(st.floats(-2.0, 2.0, width=32)),
                        beta=draw(st.floats(-2.0, 2.0, width=32)))
    return attrs_of(op_type)


@st.composite
def activation_cases(draw: st.DrawFn) -> tuple[str, Attrs, np.ndarray]:
    """(op type, attrs, input) with values spread over every kink (-6..6 covers ReLU6 and HardSwish)."""
    op_type = draw(st.sampled_from(TYPES))
    attrs = draw(activation_attrs(op_type))
    shape = (draw(batches), *draw(feature_shapes(min_rank=0, max_rank=3, max_side=4)))
    x = draw(float32_arrays(shape, lo=-7.0, hi=7.0))
    return op_type, attrs, maybe_non_contiguous(x, draw(strided))


@given(activation_cases())
def test_numpy_kernel_matches_reference(case: tuple[str, Attrs, np.ndarray]) -> None:
    op_type, attrs, x = case
    (got,) = run_kernel(FACTORIES, op_type, attrs, [x])
    (want,) = reference(op_type, attrs, [x])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@given(activation_cases())
def test_fused_epilogue_matches_reference(case: tuple[str, Attrs, np.ndarray]) -> None:
    """apply_activation(to_activation(attrs)) is what a Conv/Gemm epilogue runs after fusion."""
    op_type, attrs, x = case
    y = np.array(x, dtype=np.float32, copy=True)
    apply_activation(y, OPS[op_type].to_activation(attrs))
    (want,) = reference(op_type, attrs, [x])
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)


@given(st.sampled_from(TYPES).flatmap(lambda t: st.tuples(st.just(t), activation_attrs(t))))
def test_keeps_zero_matches_value_at_zero(case: tuple[str, Attrs]) -> None:
    op_type, attrs = case
    op = OPS[op_type]
    (at_zero,) = op.reference(attrs, [np.zeros((1, 2), dtype=np.float32)], {})
    truly_keeps_zero = bool(np.all(at_zero == 0.0))
    assert op.keeps_zero_for(attrs) == truly_keeps_zero
    if activation_keeps_zero(op.to_activation(attrs)):  # the epilogue's rule may be conservative, never wrong
        assert truly_keeps_zero
    if op.keeps_zero:  # the class variable may only promise what holds for every attribute value
        assert truly_keeps_zero
    assert op.channelwise


@given(seeds, batches, feature_shapes(max_rank=3), strided)
def test_large_magnitudes_stay_finite(seed: int, n: int, shape: tuple[int, ...], flag: bool) -> None:
    """Sigmoid-based ops must not overflow to NaN on |x| ~ 1e4 (exp(1e4) is inf in float32)."""
    x = maybe_non_contiguous((np.random.default_rng(seed).standard_normal((n, *shape)) * 1e4).astype(np.float32),
                             flag)
    for op_type in TYPES:
        attrs = attrs_of(op_type)
        (got,) = run_kernel(FACTORIES, op_type, attrs, [x])
        (want,) = reference(op_type, attrs, [x])
        assert np.all(np.isfinite(got)), op_type
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=op_type)


@pytest.mark.parametrize(
    ("op_type", "raw", "torch_fn"),
    [
        ("Relu", {}, lambda F, t: F.relu(t)),
        ("Clip", {}, lambda F, t: F.relu6(t)),
        ("Clip", {"lo": -1.5, "hi": 0.5}, lambda F, t: F.hardtanh(t, -1.5, 0.5)),
        ("LeakyRelu", {"alpha": 0.1}, lambda F, t: F.leaky_relu(t, 0.1)),
        ("Sigmoid", {}, lambda F, t: t.sigmoid()),
        ("Tanh", {}, lambda F, t: t.tanh()),
        ("HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}, lambda F, t: F.hardsigmoid(t)),
        ("HardSwish", {}, lambda F, t: F.hardswish(t)),
        ("Silu", {}, lambda F, t: F.silu(t)),
    ],
)
def test_reference_matches_pytorch(op_type: str, raw: dict, torch_fn) -> None:
    """An outside definition of each activation, so a shared misunderstanding cannot hide."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-8, 8, 321, dtype=np.float32), np.float32([-3, 3, -6, 6, 0])])[None]
    (want,) = reference(op_type, attrs_of(op_type, **raw), [x])
    got = torch_fn(torch.nn.functional, torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(want, got, rtol=1e-6, atol=1e-6)


def test_defaults() -> None:
    assert OPS["Clip"].to_activation(attrs_of("Clip")) == Activation("clip", lo=0.0, hi=6.0)  # ReLU6
    assert attrs_of("LeakyRelu").alpha == 0.01
    hs = attrs_of("HardSigmoid")
    assert (hs.alpha, hs.beta) == (0.2, 0.5)


@pytest.mark.parametrize(
    ("op_type", "raw"),
    [
        ("Clip", {"lo": 1.0, "hi": 0.5}),  # lo > hi
        ("Clip", {"lo": "0"}),  # wrong type
        ("Clip", {"hi": True}),  # a boolean is not a number
        ("Clip", {"min": 0.0}),  # unknown attribute
        ("Relu", {"alpha": 0.1}),  # Relu has no attributes
        ("LeakyRelu", {"alpha": float("nan")}),
        ("LeakyRelu", {"alpha": [0.1]}),
        ("HardSigmoid", {"beta": float("inf")}),
    ],
)
def test_bad_attributes_raise_value_error(op_type: str, raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(OPS[op_type].attrs, raw)


@pytest.mark.parametrize("op_type", TYPES)
def test_infer_keeps_shape_any_rank(op_type: str) -> None:
    op = OPS[op_type]
    attrs = attrs_of(op_type)
    for shape in [(), (5,), (3, 1, 1), (2, 3, 4, 5)]:
        assert op.infer(attrs, [shape], {}) == [shape]
    assert op.macs(attrs, [(3, 4, 4)], [(3, 4, 4)], {}) == 0

"""BatchNorm: numpy kernel vs reference, reference vs PyTorch, and folding into Conv/Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.numpy_backend.batchnorm import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import parse_attrs
from parsicore.ops.batchnorm import BatchNormAttrs, fold_into_conv
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

epsilons = st.sampled_from([1e-5, 1e-3, 0.1])


def bn_weights(seed: int, channels: int, zero_var: bool = False) -> dict[str, np.ndarray]:
    """Random BN weights; variances >= 0 (all 0 when zero_var, the edge where epsilon alone keeps it finite)."""
    rng = np.random.default_rng(seed)
    var = np.zeros(channels) if zero_var else rng.uniform(0.0, 3.0, channels)
    return {
        "scale": rng.normal(1.0, 0.5, channels).astype(np.float32),
        "bias": rng.normal(0.0, 1.0, channels).astype(np.float32),
        "mean": rng.normal(0.0, 1.0, channels).astype(np.float32),
        "var": var.astype(np.float32),
    }


@given(seeds, batches, image_shapes(), st.booleans(), epsilons, st.booleans(), strided)
def test_numpy_kernel_matches_reference(seed: int, n: int, shape: tuple[int, int, int], vector: bool,
                                        epsilon: float, zero_var: bool, flag: bool) -> None:
    feature_shape = shape[:1] if vector else shape
    x = batched_input(seed, n, feature_shape, flag)
    weights = bn_weights(seed + 1, shape[0], zero_var)
    attrs = attrs_of("BatchNorm", epsilon=epsilon)
    (got,) = run_kernel(FACTORIES, "BatchNorm", attrs, [x], weights)
    (want,) = reference("BatchNorm", attrs, [x], weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("feature_shape", [(4,), (4, 3, 5)])
def test_reference_matches_pytorch(feature_shape: tuple[int, ...]) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, *feature_shape)).astype(np.float32)
    w = bn_weights(1, 4)
    (want,) = reference("BatchNorm", attrs_of("BatchNorm", epsilon=1e-3), [x], w)
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in w.items()}
    got = torch.nn.functional.batch_norm(torch.from_numpy(x.astype(np.float64)), t["mean"], t["var"], t["scale"],
                                         t["bias"], training=False, eps=1e-3).numpy()
    np.testing.assert_allclose(want, got, rtol=1e-6, atol=1e-6)


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple:
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 2))
    k = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(kh, 5)), draw(st.integers(kw, 5))
    return groups, c, k, kh, kw, h, w, draw(st.booleans()), draw(seeds), draw(batches)


@given(conv_cases(), epsilons)
def test_fold_into_conv_equals_conv_then_batchnorm(case: tuple, epsilon: float) -> None:
    groups, c, k, kh, kw, h, w, with_bias, seed, n = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    conv_w = {"weight": rng.standard_normal((k, c // groups, kh, kw)).astype(np.float32)}
    if with_bias:
        conv_w["bias"] = rng.standard_normal(k).astype(np.float32)
    conv = OPS["Conv"]
    conv_attrs = parse_attrs(conv.attrs, {"groups": groups, "pads": [1, 0, 0, 1]})
    bn = bn_weights(seed + 1, k)
    bn_attrs = attrs_of("BatchNorm", epsilon=epsilon)
    (y,) = conv.reference(conv_attrs, [x], conv_w)
    (want,) = OPS["BatchNorm"].reference(bn_attrs, [y], bn)
    fw, fb = fold_into_conv(conv_w["weight"], conv_w.get("bias"), bn["scale"], bn["bias"], bn["mean"], bn["var"],
                            epsilon)
    assert fw.dtype == np.float32 and fb.dtype == np.float32 and fw.shape == conv_w["weight"].shape
    (got,) = conv.reference(conv_attrs, [x], {"weight": fw, "bias": fb})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@given(seeds, batches, st.integers(1, 6), st.integers(1, 6), st.booleans())
def test_fold_into_gemm_equals_gemm_then_batchnorm(seed: int, n: int, f: int, k: int, with_bias: bool) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, f)).astype(np.float32)
    gemm_w = {"weight": rng.standard_normal((k, f)).astype(np.float32)}
    if with_bias:
        gemm_w["bias"] = rng.standard_normal(k).astype(np.float32)
    bn = bn_weights(seed + 1, k)
    gemm = OPS["Gemm"]
    (y,) = gemm.reference(gemm.attrs(), [x], gemm_w)
    (want,) = OPS["BatchNorm"].reference(BatchNormAttrs(), [y], bn)
    fw, fb = fold_into_conv(gemm_w["weight"], gemm_w.get("bias"), bn["scale"], bn["bias"], bn["mean"], bn["var"],
                            1e-5)
    (got,) = gemm.reference(gemm.attrs(), [x], {"weight": fw, "bias": fb})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_fold_with_zero_variance_uses_epsilon() -> None:
    """A channel with var 0 (a dead channel in training) must fold to finite values scaled by 1/sqrt(eps)."""
    w = np.ones((1, 1, 1, 1), dtype=np.float32)
    fw, fb = fold_into_conv(w, None, np.float32([1.0]), np.float32([0.5]), np.float32([2.0]), np.float32([0.0]), 0.01)
    np.testing.assert_allclose(fw.ravel(), [10.0], rtol=1e-6)
    np.testing.assert_allclose(fb, [0.5 - 2.0 * 10.0], rtol=1e-6)


def test_negative_variance_raises_value_error() -> None:
    w = bn_weights(0, 3)
    w["var"][1] = -0.5
    x = np.zeros((1, 3), dtype=np.float32)
    attrs = BatchNormAttrs()
    with pytest.raises(ValueError, match="var"):
        run_kernel(FACTORIES, "BatchNorm", attrs, [x], w)
    with pytest.raises(ValueError, match="var"):
        OPS["BatchNorm"].reference(attrs, [x], w)
    with pytest.raises(ValueError, match="var"):
        fold_into_conv(np.ones((3, 2)), None, w["scale"], w["bias"], w["mean"], w["var"], 1e-5)


def test_fold_shape_mismatch_raises_value_error() -> None:
    w = bn_weights(0, 3)
    with pytest.raises(ValueError):
        fold_into_conv(np.ones((4, 2, 1, 1)), None, w["scale"], w["bias"], w["mean"], w["var"], 1e-5)
    with pytest.raises(ValueError):
        fold_into_conv(np.ones((3, 2, 1, 1)), np.ones(4), w["scale"], w["bias"], w["mean"], w["var"], 1e-5)


def test_infer_checks_rank_and_weight_shapes() -> None:
    op, attrs = OPS["BatchNorm"], BatchNormAttrs()
    shapes = {name: (3,) for name in ("scale", "bias", "mean", "var")}
    assert op.infer(attrs, [(3, 4, 5)], shapes) == [(3, 4, 5)]
    assert op.infer(attrs, [(3,)], shapes) == [(3,)]
    assert op.macs(attrs, [(3, 4, 5)], [(3, 4, 5)], shapes) == 60
    assert op.channelwise and not op.keeps_zero
    with pytest.raises(ValueError):
        op.infer(attrs, [(3, 4)], shapes)
    with pytest.raises(ValueError):
        op.infer(attrs, [(2, 4, 5)], shapes)
    with pytest.raises(ValueError):
        op.infer(attrs, [(3, 4, 5)], {**shapes, "var": (3, 1)})


@pytest.mark.parametrize("raw", [{"epsilon": 0.0}, {"epsilon": -1e-5}, {"epsilon": "1e-5"}, {"momentum": 0.9}])
def test_bad_attributes_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(BatchNormAttrs, raw)

"""Gates: LKAM/TopK switch kernels vs the float64 references, thresholded masks, PyTorch semantics, ChannelMask.

Kernels output raw switches (LKAM: s, TopK: saliency g); the tests apply the threshold / top-k themselves
and compare with the reference masks. A switch within a hair of the threshold (or a top-k boundary between
two nearly equal saliencies) may legitimately land on either side in float32 vs float64; those positions
are excluded, everything else must match exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels.base import Activation, KernelSpec
from parsicore.kernels.numpy_backend.gates import FACTORIES
from parsicore.ops import OPS
from parsicore.ops.base import parse_attrs
from parsicore.ops.gates import LKAMGateAttrs, TopKGateAttrs, kept_count, lkam_switches, topk_saliency
from tests.ops._strategies_misc import (
    batched_input,
    batches,
    image_shapes,
    out_shapes,
    reference,
    run_kernel,
    seeds,
    strided,
)
from tests.strategies import maybe_non_contiguous

AMBIGUOUS = 1e-5  # |s - threshold| below this may flip between float32 and float64


def lkam_weights(seed: int, c: int, m: int, k: int, out_kernels: int | None) -> dict[str, np.ndarray]:
    """Bank weights scaled so pre-sigmoid values are O(1) and switches spread over (0, 1)."""
    rng = np.random.default_rng(seed)
    w = {"w1": (rng.standard_normal((m, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32),
         "b1": rng.standard_normal(m).astype(np.float32)}
    if out_kernels is not None:
        w["w2"] = (rng.standard_normal((out_kernels, m, 1, 1)) / np.sqrt(m)).astype(np.float32)
        w["b2"] = rng.standard_normal(out_kernels).astype(np.float32)
    return w


@st.composite
def lkam_cases(draw: st.DrawFn) -> tuple[LKAMGateAttrs, np.ndarray, dict[str, np.ndarray]]:
    n = draw(batches)
    c, h, w = draw(image_shapes(max_channels=5, max_side=6))
    k = draw(st.sampled_from([1, 3, 5]))
    m = draw(st.integers(1, 6))
    out_kernels = draw(st.one_of(st.none(), st.integers(1, 6)))
    attrs = LKAMGateAttrs(kernel_size=k, activation=draw(st.sampled_from(["relu", "none"])),
                          pool=draw(st.sampled_from(["avg", "max"])), threshold=draw(st.floats(0.0, 1.0)),
                          mode=draw(st.sampled_from(["hard", "scaled"])))
    seed = draw(seeds)
    x = batched_input(seed, n, (c, h, w), draw(strided))
    return attrs, x, lkam_weights(seed + 1, c, m, k, out_kernels)


def threshold_switches(s: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """What the runtime does with LKAM switches: the test's own copy of the rule."""
    on = s > threshold
    return np.where(on, 1.0 if mode == "hard" else s, 0.0).astype(np.float32)


def stable_topk_mask(g: np.ndarray, keep: int, scaled: bool) -> np.ndarray:
    """The test's own top-k: a stable argsort of -g keeps the lower index among equals."""
    mask = np.zeros_like(g, dtype=np.float32)
    for i in range(g.shape[0]):
        kept = np.argsort(-g[i], kind="stable")[:keep]
        mask[i, kept] = g[i, kept] if scaled else 1.0
    return mask


# --- LKAMGate -------------------------------------------------------------------------------------------------


@given(lkam_cases())
def test_lkam_kernel_switches_match_reference(case: tuple) -> None:
    attrs, x, weights = case
    (s,) = run_kernel(FACTORIES, "LKAMGate", attrs, [x], weights)
    (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    assert want.dtype == np.float32 and want.shape == s.shape
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)


@given(lkam_cases())
def test_lkam_thresholded_kernel_switches_equal_reference_mask(case: tuple) -> None:
    attrs, x, weights = case
    (s,) = run_kernel(FACTORIES, "LKAMGate", attrs, [x], weights)
    (want,) = reference("LKAMGate", attrs, [x], weights)
    clear = np.abs(s - attrs.threshold) > AMBIGUOUS
    got = threshold_switches(s, attrs.threshold, attrs.mode)
    np.testing.assert_array_equal(got[clear] > 0, want[clear] > 0)
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-5, atol=1e-5)


@given(lkam_cases())
def test_lkam_numba_kernel_switches_match_reference(case: tuple) -> None:
    """The numba LKAM kernel (bank1 1x1: one compiled pass; other sizes delegate to NumPy's kernel)."""
    numba_gates = pytest.importorskip("parsicore.kernels.numba_backend.gates")
    attrs, x, weights = case
    (s,) = run_kernel(numba_gates.FACTORIES, "LKAMGate", attrs, [x], weights)
    (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pool", "two_banks", "activation"), [("avg", True, "relu"), ("avg", True, "none"),
                                                              ("max", True, "relu"), ("avg", False, "relu"),
                                                              ("max", False, "none")])
def test_lkam_numba_kernel_at_network_sizes(pool: str, two_banks: bool, activation: str) -> None:
    """The numba LKAM kernel at the sizes of real gates (BLAS bank1 into scratch, then the compiled rest),
    a batch of 2 whose images get their own switches, against the reference."""
    numba_gates = pytest.importorskip("parsicore.kernels.numba_backend.gates")
    attrs = LKAMGateAttrs(kernel_size=1, pool=pool, activation=activation)
    x = batched_input(7, 2, (24, 30, 29), False)
    weights = lkam_weights(8, 24, 6, 1, 40 if two_banks else None)
    (s,) = run_kernel(numba_gates.FACTORIES, "LKAMGate", attrs, [x], weights)
    (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    assert s.shape == (2, 40 if two_banks else 6)
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)


# Each configuration drives one path of the numpy LKAM kernel (see its module docstring).
LKAM_PATHS = {
    "pool_input_first_one_bank": dict(kernel_size=1, pool="avg", two_banks=False, activation="relu"),
    "pool_input_first_linear_two_banks": dict(kernel_size=1, pool="avg", two_banks=True, activation="none"),
    "pixelwise_1x1_relu_then_pool_then_bank2": dict(kernel_size=1, pool="avg", two_banks=True, activation="relu"),
    "pixelwise_1x1_max_pool_one_bank": dict(kernel_size=1, pool="max", two_banks=False, activation="relu"),
    "im2col_3x3_avg_two_banks": dict(kernel_size=3, pool="avg", two_banks=True, activation="relu"),
    "im2col_3x3_avg_linear_two_banks": dict(kernel_size=3, pool="avg", two_banks=True, activation="none"),
    "im2col_5x5_max_two_banks": dict(kernel_size=5, pool="max", two_banks=True, activation="relu"),
    "im2col_3x3_max_one_bank": dict(kernel_size=3, pool="max", two_banks=False, activation="none"),
}


@pytest.mark.parametrize("path", sorted(LKAM_PATHS))
@pytest.mark.parametrize("spatial", [(1, 1), (2, 7), (6, 5)])
def test_lkam_kernel_paths(path: str, spatial: tuple[int, int]) -> None:
    cfg = LKAM_PATHS[path]
    attrs = LKAMGateAttrs(kernel_size=cfg["kernel_size"], pool=cfg["pool"], activation=cfg["activation"])
    x = batched_input(3, 3, (4, *spatial), True)
    weights = lkam_weights(4, 4, 5, cfg["kernel_size"], 6 if cfg["two_banks"] else None)
    (s,) = run_kernel(FACTORIES, "LKAMGate", attrs, [x], weights)
    assert s.shape == (3, 6 if cfg["two_banks"] else 5)
    np.testing.assert_allclose(s, lkam_switches(attrs, x, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["hard", "scaled"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_lkam_masks_from_all_on_to_all_off(mode: str, kernel_size: int) -> None:
    """b2 = +20 on the first ``on`` kernels and -20 on the rest: 100 % ... 0 % of the mask on."""
    out_kernels = 8
    x = batched_input(0, 2, (3, 4, 4), False)
    base = lkam_weights(1, 3, 4, kernel_size, out_kernels)
    base["w2"] *= 0.01  # the bias dominates
    for on in range(out_kernels + 1):
        weights = {**base, "b2": np.float32([20.0] * on + [-20.0] * (out_kernels - on))}
        expected_on = np.array([True] * on + [False] * (out_kernels - on))
        for threshold in (0.05, 0.5, 0.95):
            attrs = LKAMGateAttrs(kernel_size=kernel_size, threshold=threshold, mode=mode)
            (want,) = reference("LKAMGate", attrs, [x], weights)
            np.testing.assert_array_equal(want > 0, np.tile(expected_on, (2, 1)))
            (s,) = run_kernel(FACTORIES, "LKAMGate", attrs, [x], weights)
            got = threshold_switches(s, threshold, mode)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kernel_size", "pool"), [(1, "avg"), (3, "max"), (3, "avg")])
def test_lkam_images_in_a_batch_get_their_own_masks(kernel_size: int, pool: str) -> None:
    """One bank with w1 = 10 * identity at the kernel centre: image n's channel c is switched by its sign."""
    patterns = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)
    x = np.where(patterns, 1.0, -1.0).astype(np.float32)[:, :, None, None] * np.ones((1, 1, 3, 5), np.float32)
    w1 = np.zeros((4, 4, kernel_size, kernel_size), dtype=np.float32)
    w1[:, :, kernel_size // 2, kernel_size // 2] = 10.0 * np.eye(4)
    weights = {"w1": w1, "b1": np.zeros(4, dtype=np.float32)}
    attrs = LKAMGateAttrs(kernel_size=kernel_size, pool=pool)
    (want,) = reference("LKAMGate", attrs, [x], weights)
    np.testing.assert_array_equal(want, patterns.astype(np.float32))
    (s,) = run_kernel(FACTORIES, "LKAMGate", attrs, [maybe_non_contiguous(x, True)], weights)
    np.testing.assert_array_equal(threshold_switches(s, 0.5, "hard"), want)


@pytest.mark.parametrize("mode", ["hard", "scaled"])
def test_lkam_switch_exactly_at_the_threshold_is_off(mode: str) -> None:
    """Zero banks give s = sigmoid(0) = 0.5 exactly, in float32 and float64: s > 0.5 is false."""
    weights = {"w1": np.zeros((3, 2, 1, 1), np.float32), "b1": np.zeros(3, np.float32)}
    x = np.ones((2, 2, 3, 3), np.float32)
    (mask,) = reference("LKAMGate", LKAMGateAttrs(threshold=0.5, mode=mode), [x], weights)
    assert not mask.any()
    (s,) = run_kernel(FACTORIES, "LKAMGate", LKAMGateAttrs(), [x], weights)
    np.testing.assert_array_equal(s, 0.5)
    (mask,) = reference("LKAMGate", LKAMGateAttrs(threshold=0.49, mode=mode), [x], weights)
    np.testing.assert_array_equal(mask, 1.0 if mode == "hard" else 0.5)


@given(lkam_cases())
def test_lkam_threshold_override_and_extremes(case: tuple) -> None:
    """Callers override the threshold with dataclasses.replace; threshold 1 switches everything off."""
    attrs, x, weights = case
    s = lkam_switches(attrs, x, weights)
    for threshold in (0.0, 0.25, 0.75, 1.0):
        (mask,) = reference("LKAMGate", dataclasses.replace(attrs, threshold=threshold), [x], weights)
        np.testing.assert_array_equal(mask > 0, s > threshold)
        if attrs.mode == "scaled":
            np.testing.assert_allclose(mask, np.where(s > threshold, s, 0.0), rtol=1e-6)
    (mask,) = reference("LKAMGate", dataclasses.replace(attrs, threshold=1.0), [x], weights)
    assert not mask.any()


@pytest.mark.parametrize(
    ("hidden", "kernel_size", "activation", "pool"),
    [(8, 1, "relu", "avg"), (8, 3, "none", "max"), (None, 3, "relu", "avg"), (4, 5, "relu", "max")],
)
def test_lkam_reference_matches_torch_module(hidden: int | None, kernel_size: int, activation: str, pool: str) -> None:
    """parsicore.export.torch_modules.LKAMGate is what training uses: the engine must agree with it."""
    torch = pytest.importorskip("torch")
    from parsicore.export.torch_modules import LKAMGate as TorchLKAMGate

    torch.manual_seed(0)
    for mode in ("hard", "scaled"):
        gate = TorchLKAMGate(5, 6, hidden=hidden, kernel_size=kernel_size, activation=activation, pool=pool,
                             threshold=0.5, mode=mode, init_bias=0.0).eval()
        weights = {"w1": gate.bank1.weight, "b1": gate.bank1.bias}
        if gate.bank2 is not None:
            weights.update(w2=gate.bank2.weight, b2=gate.bank2.bias)
        weights = {k: v.detach().numpy().astype(np.float32) for k, v in weights.items()}
        x = np.random.default_rng(1).standard_normal((3, 5, 6, 7)).astype(np.float32)
        with torch.no_grad():
            torch_s = gate.switches(torch.from_numpy(x)).numpy()
            torch_mask = gate(torch.from_numpy(x)).numpy()
        attrs = LKAMGateAttrs(kernel_size=kernel_size, activation=activation, pool=pool, mode=mode)
        np.testing.assert_allclose(lkam_switches(attrs, x, weights), torch_s, rtol=1e-5, atol=1e-6)
        (mask,) = reference("LKAMGate", attrs, [x], weights)
        clear = np.abs(torch_s - 0.5) > AMBIGUOUS
        np.testing.assert_allclose(mask[clear], torch_mask[clear], rtol=1e-5, atol=1e-6)
        assert OPS["LKAMGate"].macs(attrs, [(5, 6, 7)], [(6,)], {k: v.shape for k, v in weights.items()}) == \
            gate.bank_macs(6, 7)


def test_lkam_infer() -> None:
    op = OPS["LKAMGate"]
    attrs = LKAMGateAttrs(kernel_size=3)
    one_bank = {"w1": (4, 5, 3, 3), "b1": (4,)}
    two_banks = {**one_bank, "w2": (7, 4, 1, 1), "b2": (7,)}
    assert op.infer(attrs, [(5, 8, 8)], one_bank) == [(4,)]
    assert op.infer(attrs, [(5, 8, 8)], two_banks) == [(7,)]
    assert op.macs(attrs, [(5, 8, 8)], [(7,)], two_banks) == 4 * 5 * 9 * 64 + 7 * 4 * 64
    assert op.is_gate and OPS["TopKGate"].is_gate and not OPS["ChannelMask"].is_gate
    bad = [
        [(5, 8)],  # not an image
        [(6, 8, 8)],  # w1 expects 5 channels
    ]
    for in_shapes in bad:
        with pytest.raises(ValueError):
            op.infer(attrs, in_shapes, one_bank)
    for weights in [
        {**one_bank, "w1": (4, 5, 1, 1)},  # kernel size differs from the attribute
        {**one_bank, "w1": (4, 5, 3)},
        {**one_bank, "b1": (5,)},
        {**one_bank, "w2": (7, 4, 1, 1)},  # w2 without b2
        {**one_bank, "b2": (7,)},
        {**two_banks, "w2": (7, 3, 1, 1)},
        {**two_banks, "w2": (7, 4, 3, 3)},
        {**two_banks, "b2": (6,)},
    ]:
        with pytest.raises(ValueError):
            op.infer(attrs, [(5, 8, 8)], weights)


@pytest.mark.parametrize(
    "raw",
    [{"kernel_size": 2}, {"kernel_size": 0}, {"kernel_size": 3.0}, {"activation": "sigmoid"}, {"pool": "min"},
     {"threshold": 1.5}, {"threshold": -0.1}, {"threshold": "0.5"}, {"mode": "soft"}, {"hidden": 16}],
)
def test_lkam_bad_attributes_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(LKAMGateAttrs, raw)


# --- TopKGate -------------------------------------------------------------------------------------------------


@st.composite
def topk_cases(draw: st.DrawFn) -> tuple[TopKGateAttrs, np.ndarray, dict[str, np.ndarray]]:
    n = draw(batches)
    c, h, w = draw(image_shapes(max_channels=6, max_side=5))
    shape = (c, h, w) if draw(st.booleans()) else (c,)
    k = draw(st.integers(1, 8))
    attrs = TopKGateAttrs(keep_ratio=draw(st.floats(0.01, 1.0)), activation=draw(st.sampled_from(["relu", "none"])),
                          pool=draw(st.sampled_from(["avg", "max"])), scaled=draw(st.booleans()))
    seed = draw(seeds)
    rng = np.random.default_rng(seed + 1)
    weights = {"weight": rng.standard_normal((k, c)).astype(np.float32),
               "bias": rng.standard_normal(k).astype(np.float32)}
    return attrs, batched_input(seed, n, shape, draw(strided)), weights


@given(topk_cases())
def test_topk_kernel_saliency_matches_reference(case: tuple) -> None:
    attrs, x, weights = case
    (g,) = run_kernel(FACTORIES, "TopKGate", attrs, [x], weights)
    (want,) = OPS["TopKGate"].switches(attrs, [x], weights)
    assert want.dtype == np.float32 and want.shape == g.shape
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want, topk_saliency(attrs, x, weights), rtol=1e-6, atol=1e-6)


@given(topk_cases())
def test_topk_mask_from_kernel_saliency_equals_reference_mask(case: tuple) -> None:
    attrs, x, weights = case
    (g,) = run_kernel(FACTORIES, "TopKGate", attrs, [x], weights)
    (want,) = reference("TopKGate", attrs, [x], weights)
    keep = kept_count(attrs.keep_ratio, g.shape[1])
    got = stable_topk_mask(g, keep, attrs.scaled)
    for i in range(g.shape[0]):
        ordered = np.sort(g[i])[::-1]
        if keep < len(ordered) and 0.0 < ordered[keep - 1] - ordered[keep] < AMBIGUOUS:
            continue  # a near-tie at the boundary may go either way in float32 vs float64
        np.testing.assert_array_equal(got[i] != 0, want[i] != 0)
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5)
        if not attrs.scaled:
            assert int(want[i].sum()) == keep


@pytest.mark.parametrize(
    ("bias", "keep_ratio", "activation", "expected_kept"),
    [
        ([1.0, 2.0, 2.0, 2.0], 0.5, "none", [1, 2]),  # ties at 2.0: the lower indices win
        ([-1.0, -2.0, -3.0, -4.0], 0.5, "relu", [0, 1]),  # relu makes them all 0: lowest indices
        ([-1.0, -2.0, -3.0, -4.0], 0.5, "none", [0, 1]),
        ([3.0, 1.0, 3.0, 3.0], 0.25, "none", [0]),
        ([0.5, 0.5, 0.5, 0.5], 0.75, "none", [0, 1, 2]),
        ([0.5, 0.7, 0.1, 0.2], 1.0, "none", [0, 1, 2, 3]),
    ],
)
def test_topk_reference_ties_go_to_the_lower_index(bias: list, keep_ratio: float, activation: str,
                                                   expected_kept: list) -> None:
    weights = {"weight": np.zeros((4, 3), dtype=np.float32), "bias": np.float32(bias)}
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    for scaled in (False, True):
        attrs = TopKGateAttrs(keep_ratio=keep_ratio, activation=activation, scaled=scaled)
        (mask,) = reference("TopKGate", attrs, [x], weights)
        g = np.maximum(np.float32(bias), 0.0) if activation == "relu" else np.float32(bias)
        expected = np.zeros(4, dtype=np.float32)
        expected[expected_kept] = g[expected_kept] if scaled else 1.0
        np.testing.assert_array_equal(mask, np.tile(expected, (2, 1)))


@given(st.floats(0.001, 1.0), st.integers(1, 300))
def test_kept_count(keep_ratio: float, k: int) -> None:
    count = kept_count(keep_ratio, k)
    assert 1 <= count <= k
    assert count >= keep_ratio * k > count - 1


def test_topk_reference_matches_torch_module() -> None:
    torch = pytest.importorskip("torch")
    from parsicore.export.torch_modules import TopKGate as TorchTopKGate

    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((3, 6, 4, 5)).astype(np.float32)
    for keep_ratio, scaled, activation, pool in [(0.5, True, "relu", "avg"), (0.3, False, "none", "max"),
                                                 (1.0, True, "none", "avg")]:
        gate = TorchTopKGate(6, 10, keep_ratio=keep_ratio, scaled=scaled, activation=activation, pool=pool).eval()
        weights = {"weight": gate.fc.weight.detach().numpy(), "bias": gate.fc.bias.detach().numpy()}
        with torch.no_grad():
            torch_mask = gate(torch.from_numpy(x)).numpy()
        attrs = TopKGateAttrs(keep_ratio=keep_ratio, activation=activation, pool=pool, scaled=scaled)
        (mask,) = reference("TopKGate", attrs, [x], weights)
        assert kept_count(keep_ratio, 10) == gate.k
        np.testing.assert_allclose(mask, torch_mask, rtol=1e-5, atol=1e-6)


def test_topk_infer() -> None:
    op, attrs = OPS["TopKGate"], TopKGateAttrs()
    weights = {"weight": (7, 5), "bias": (7,)}
    assert op.infer(attrs, [(5, 3, 3)], weights) == [(7,)]
    assert op.infer(attrs, [(5,)], weights) == [(7,)]
    assert op.macs(attrs, [(5, 3, 3)], [(7,)], weights) == 35
    for in_shapes, w in [([(4, 3, 3)], weights), ([(5, 3)], weights), ([(5,)], {**weights, "bias": (6,)}),
                         ([(5,)], {**weights, "weight": (7, 5, 1)})]:
        with pytest.raises(ValueError):
            op.infer(attrs, in_shapes, w)


@pytest.mark.parametrize(
    "raw",
    [{"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": -0.5}, {"scaled": 1}, {"activation": "tanh"},
     {"pool": "sum"}, {"k": 3}],
)
def test_topk_bad_attributes_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        parse_attrs(TopKGateAttrs, raw)


@pytest.mark.parametrize("op_type", ["LKAMGate", "TopKGate"])
def test_gate_kernels_refuse_a_fused_activation(op_type: str) -> None:
    attrs = OPS[op_type].attrs()
    weights = lkam_weights(0, 2, 3, 1, None) if op_type == "LKAMGate" else {
        "weight": np.ones((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    with pytest.raises(ValueError):
        run_kernel(FACTORIES, op_type, attrs, [np.ones((1, 2, 2, 2), np.float32)], weights,
                   activation=Activation("relu"))


# --- ChannelMask ----------------------------------------------------------------------------------------------


@given(seeds, batches, image_shapes(), st.booleans(), strided, strided)
def test_channel_mask_numpy_kernel_matches_reference(seed: int, n: int, shape: tuple, vector: bool,
                                                     flag_x: bool, flag_mask: bool) -> None:
    feature_shape = shape[:1] if vector else shape
    x = batched_input(seed, n, feature_shape, flag_x)
    rng = np.random.default_rng(seed + 1)
    mask = np.where(rng.random((n, shape[0])) < 0.5, 0.0, rng.random((n, shape[0]))).astype(np.float32)
    mask = maybe_non_contiguous(mask, flag_mask)
    (got,) = run_kernel(FACTORIES, "ChannelMask", OPS["ChannelMask"].attrs(), [x, mask])
    (want,) = reference("ChannelMask", OPS["ChannelMask"].attrs(), [x, mask])
    np.testing.assert_array_equal(want, x * mask.reshape(mask.shape + (1,) * (x.ndim - 2)))
    np.testing.assert_array_equal(got, want)


@given(seeds, batches, image_shapes(), strided, strided)
def test_channel_mask_numba_kernel_matches_reference(seed: int, n: int, shape: tuple, flag_x: bool,
                                                     flag_mask: bool) -> None:
    """The numba kernel (copy / zero-fill / multiply per channel), forced on for small inputs."""
    numba_gates = pytest.importorskip("parsicore.kernels.numba_backend.gates")
    x = batched_input(seed, n, shape, flag_x)
    rng = np.random.default_rng(seed + 1)
    u = rng.random((n, shape[0]))
    mask = np.where(u < 0.3, 0.0, np.where(u < 0.6, 1.0, rng.random((n, shape[0])))).astype(np.float32)
    mask = maybe_non_contiguous(mask, flag_mask)
    below = numba_gates.NUMPY_BELOW
    try:
        numba_gates.NUMPY_BELOW = 0
        (got,) = run_kernel(numba_gates.FACTORIES, "ChannelMask", OPS["ChannelMask"].attrs(), [x, mask])
    finally:
        numba_gates.NUMPY_BELOW = below
    (want,) = reference("ChannelMask", OPS["ChannelMask"].attrs(), [x, mask])
    np.testing.assert_array_equal(got, want)


def test_channel_mask_infer() -> None:
    op = OPS["ChannelMask"]
    attrs = op.attrs()
    assert op.num_inputs == (2, 2) and op.channelwise and op.keeps_zero
    assert op.infer(attrs, [(4, 3, 3), (4,)], {}) == [(4, 3, 3)]
    assert op.infer(attrs, [(4,), (4,)], {}) == [(4,)]
    for in_shapes in [[(4, 3, 3), (3,)], [(4, 3, 3), (4, 1, 1)], [(4, 3), (4,)]]:
        with pytest.raises(ValueError):
            op.infer(attrs, in_shapes, {})


# --- Agreement with the engine's switches -> mask rule (parsicore.gates) ------------------------------------


@given(lkam_cases())
def test_engine_lkam_mask_rule_agrees_with_reference(case: tuple) -> None:
    from parsicore import gates

    attrs, x, weights = case
    (s,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    (want,) = reference("LKAMGate", attrs, [x], weights)
    got = gates.mask_from_switches("LKAMGate", attrs, s)
    clear = np.abs(s - attrs.threshold) > AMBIGUOUS
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-6, atol=1e-6)
    # The runtime's path: the mask written into the step's output buffer (garbage before), same values.
    out = np.full(s.shape, np.nan, dtype=np.float32)
    assert gates.mask_from_switches("LKAMGate", attrs, s, out=out) is out
    np.testing.assert_allclose(out[clear], want[clear], rtol=1e-6, atol=1e-6)


@given(topk_cases())
def test_engine_topk_mask_rule_agrees_with_reference(case: tuple) -> None:
    from parsicore import gates

    attrs, x, weights = case
    (g,) = OPS["TopKGate"].switches(attrs, [x], weights)
    (want,) = reference("TopKGate", attrs, [x], weights)
    got = gates.mask_from_switches("TopKGate", attrs, g)
    for i in range(g.shape[0]):
        ordered = np.sort(topk_saliency(attrs, x, weights)[i])[::-1]
        keep = kept_count(attrs.keep_ratio, len(ordered))
        if keep < len(ordered) and 0.0 < ordered[keep - 1] - ordered[keep] < AMBIGUOUS:
            continue
        np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-6)


def test_engine_topk_count_agrees_with_reference_when_ratio_times_k_rounds_up() -> None:
    from parsicore import gates

    keep_ratio, k = 0.14, 50  # 0.14 * 50 == 7.000000000000001 in binary floating point
    g = np.linspace(1.0, 2.0, k, dtype=np.float32)[None]
    got = gates.mask_from_switches("TopKGate", TopKGateAttrs(keep_ratio=keep_ratio, scaled=False), g)
    assert int(got.sum()) == kept_count(keep_ratio, k) == 8


# --- The numba backend's fused bank1 (row GEMM microkernel, pooled in place) ------------------------------------


def fused_gates() -> object:
    """The numba gates module when its fused bank1 can run here (the row GEMM's microkernel), else skip."""
    numba_gates = pytest.importorskip("parsicore.kernels.numba_backend.gates")
    if not numba_gates.row_gemm.ENABLED:
        pytest.skip("no row GEMM microkernel on this machine")
    return numba_gates


def run_fused(numba_gates: object, attrs: LKAMGateAttrs, x: np.ndarray, weights: dict[str, np.ndarray],
              threads: int = 1, depth: int | None = None) -> np.ndarray:
    """The numba LKAM kernel built with the fused bank1 at any size (and K passes of ``depth`` steps), checked to
    take it; its switches for x."""
    from tests.ops._strategies_conv import constants_set, thread_context

    values = {} if depth is None else {"DEPTH": depth}
    with constants_set(numba_gates, FUSED_MIN_PIXELS=1), constants_set(numba_gates.row_gemm, **values):
        spec = KernelSpec(op="LKAMGate", attrs=attrs, weights=weights, in_shapes=(tuple(x.shape[1:]),),
                          out_shapes=out_shapes("LKAMGate", attrs, [x], weights), context=thread_context(threads))
        kernel = numba_gates.make_lkam_gate(spec)
    assert kernel.__name__ == "fused_lkam_gate"
    out = np.full((x.shape[0], *spec.out_shapes[0]), np.nan, dtype=np.float32)
    before = x.copy()
    kernel([x], [out])
    np.testing.assert_array_equal(x, before)
    return out


@given(n=st.integers(1, 2), c=st.sampled_from([1, 3, 17, 130]), m=st.integers(1, 14), side=st.integers(1, 40),
       two_banks=st.booleans(), pool=st.sampled_from(["avg", "max"]), activation=st.sampled_from(["relu", "none"]),
       depth=st.sampled_from([None, 5]), threads=st.sampled_from([1, 2]), seed=seeds, flag=strided)
def test_lkam_fused_bank1_matches_reference(n: int, c: int, m: int, side: int, two_banks: bool, pool: str,
                                            activation: str, depth: int | None, threads: int, seed: int,
                                            flag: bool) -> None:
    """At every edge of the fused pass: hidden rows in tiles of fewer than ROWS, pixel counts off the 64-lane
    blocks and fewer blocks than POOL_CHUNKS, K in passes of 5 steps or past 128, one or two banks, avg or max
    pool (a max after bank2 keeps the unfused kernel), a batch of 2, strided input, 2 threads."""
    numba_gates = fused_gates()
    if two_banks and pool == "max":
        pool = "avg"
    attrs = LKAMGateAttrs(kernel_size=1, pool=pool, activation=activation)
    x = batched_input(seed, n, (c, side, side + 3), flag)
    weights = lkam_weights(seed + 1, c, m, 1, 9 if two_banks else None)
    s = run_fused(numba_gates, attrs, x, weights, threads, depth)
    (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_lkam_fused_bank1_propagates_nan(pool: str) -> None:
    """A NaN pixel makes every switch NaN, as the reference's sum or max over it (the max's lane partials and
    their combination keep it, whichever lane and chunk it falls in). No ReLU between the banks: the reference's
    maps NaN to 0 (np.where), the kernels' keeps it, as torch.relu does."""
    numba_gates = fused_gates()
    attrs = LKAMGateAttrs(kernel_size=1, pool=pool, activation="none")
    weights = lkam_weights(3, 4, 5, 1, None if pool == "max" else 6)
    for where in [(0, 0), (0, 70), (3, 1000), (2, 2047)]:
        x = batched_input(2, 1, (4, 32, 64), False)
        x.reshape(4, -1)[where] = np.nan
        s = run_fused(numba_gates, attrs, x, weights)
        (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
        assert np.isnan(want).all()
        assert np.isnan(s).all(), where


def test_lkam_fused_bank1_max_of_negative_rows() -> None:
    """One bank, max pool, every bank1 value negative (b1 = -50): the pooled max is negative, not the 0 an empty
    partial would start from."""
    numba_gates = fused_gates()
    attrs = LKAMGateAttrs(kernel_size=1, pool="max")
    x = batched_input(4, 2, (6, 20, 70), False)
    weights = lkam_weights(5, 6, 7, 1, None)
    weights["b1"] = np.full(7, -50.0, dtype=np.float32)
    weights["w1"] *= np.float32(0.1)
    s = run_fused(numba_gates, attrs, x, weights)
    (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    assert (want < 1e-20).all() and (want > 0).all()
    np.testing.assert_allclose(s, want, rtol=1e-4)


def test_lkam_fused_bank1_same_switches_at_any_thread_count() -> None:
    """The pool's partials are per chunk of pixels, and the chunks are fixed, not per thread: above the size where
    the kernel runs on 2 threads, the switches are the same numbers as with 1 (and match the reference)."""
    numba_gates = fused_gates()
    attrs = LKAMGateAttrs(kernel_size=1)
    x = batched_input(5, 1, (32, 190, 190), False)
    assert 32 * 190 * 190 >= numba_gates_min_parallel_work()
    weights = lkam_weights(6, 32, 4, 1, 32)
    one = run_fused(numba_gates, attrs, x, weights, threads=1)
    two = run_fused(numba_gates, attrs, x, weights, threads=2)
    np.testing.assert_array_equal(one, two)
    (want,) = OPS["LKAMGate"].switches(attrs, [x], weights)
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)


def numba_gates_min_parallel_work() -> int:
    from parsicore.kernels.numba_backend.parallel import MIN_PARALLEL_WORK

    return MIN_PARALLEL_WORK


def test_lkam_fused_bank1_is_the_default_only_on_large_inputs() -> None:
    """Built without overrides, the numba gate fuses bank1 from FUSED_MIN_PIXELS pixels on, and never for a max
    pool after bank2 (which needs bank2 on every pixel)."""
    numba_gates = fused_gates()
    weights = lkam_weights(1, 8, 4, 1, 8)

    def built(side: int, pool: str) -> str:
        attrs = LKAMGateAttrs(kernel_size=1, pool=pool)
        spec = KernelSpec(op="LKAMGate", attrs=attrs, weights=weights, in_shapes=((8, side, side),),
                          out_shapes=((8,),))
        return numba_gates.make_lkam_gate(spec).__name__

    big = int(np.ceil(np.sqrt(numba_gates.FUSED_MIN_PIXELS)))
    assert built(big, "avg") == "fused_lkam_gate"
    assert built(big - 1, "avg") == "lkam_gate"
    assert built(big, "max") == "lkam_gate"

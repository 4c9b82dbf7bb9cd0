"""Gated models: every backend's skipping run equals dense compute followed by the mask (naive interpreter),
the MAC accounting matches the masks, and the run-time knobs (threshold, keep ratio) behave."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import parsicore
from parsicore.errors import InputError
from parsicore.ops.gates import kept_count
from tests.models import gated_cnn
from tests.naive import naive_run
from tests.strategies import backends, seeded_array

ALL_BACKENDS = ["reference", *backends()]


def _near_decision(model, x, threshold, keep) -> bool:
    """True when a switch sits within float noise of the decision boundary (then backends may legitimately
    disagree on that one kernel)."""
    import dataclasses

    from parsicore.graph import Graph

    graph = Graph.from_model_file(model)
    tensors = naive_run(model, x, capture=True)
    for node in graph.nodes:
        if node.type == "LKAMGate":
            t = node.attrs.threshold if threshold is None else threshold
            lo = node.op.reference(dataclasses.replace(node.attrs, threshold=max(0.0, t - 2e-4)),
                                   [tensors[node.inputs[0]]], node.weights)[0]
            hi = node.op.reference(dataclasses.replace(node.attrs, threshold=min(1.0, t + 2e-4)),
                                   [tensors[node.inputs[0]]], node.weights)[0]
            if not np.array_equal(lo != 0, hi != 0):
                return True
        if node.type == "TopKGate":
            # Saliency = the scaled mask with keep 1.0; a near-tie at the k-th place is ambiguous.
            full = node.op.reference(dataclasses.replace(node.attrs, keep_ratio=1.0, scaled=True),
                                     [tensors[node.inputs[0]]], node.weights)[0]
            r = node.attrs.keep_ratio if keep is None else keep
            k = min(full.shape[1], kept_count(r, full.shape[1]))
            s = -np.sort(-full, axis=1)
            if k < full.shape[1] and np.any(np.abs(s[:, k - 1] - s[:, k]) < 2e-4):
                return True
    return False


@given(
    seed=st.integers(0, 10_000),
    gate=st.sampled_from(["lkam", "topk"]),
    mode=st.sampled_from(["hard", "scaled"]),
    offset=st.sampled_from([-20.0, -2.0, -0.5, 0.0, 0.5, 2.0, 20.0]),
    batch=st.integers(1, 3),
    two_banks=st.booleans(),
    gate_kernel=st.sampled_from([1, 3]),
    keep_ratio=st.sampled_from([0.1, 0.5, 0.75, 1.0]),
    backend=st.sampled_from(ALL_BACKENDS),
)
def test_gated_model_equals_dense_then_mask(seed, gate, mode, offset, batch, two_banks, gate_kernel, keep_ratio,
                                            backend):
    model = gated_cnn(seed, gate=gate, mode=mode, offset=offset, two_banks=two_banks, gate_kernel=gate_kernel,
                      scaled=mode == "scaled", keep_ratio=keep_ratio)
    x = seeded_array(seed, (batch, 3, 10, 10))
    assume(not _near_decision(model, x, None, None))
    expected = naive_run(model, x)["logits"]
    got = parsicore.load(model, backend=backend)(x)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)


@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]),
       backend=st.sampled_from(backends()))
def test_threshold_override_equals_naive_with_that_threshold(seed, threshold, backend):
    model = gated_cnn(seed, gate="lkam", offset=0.0)
    x = seeded_array(seed + 1, (2, 3, 10, 10))
    assume(not _near_decision(model, x, threshold, None))
    expected = naive_run(model, x, threshold=threshold)["logits"]
    got = parsicore.load(model, backend=backend)(x, threshold=threshold)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def _expected_macs(model, x, threshold=None, keep=None) -> tuple[int, int]:
    """Executed and dense MACs computed independently from the naive masks (per image, summed)."""
    from parsicore.graph import Graph

    graph = Graph.from_model_file(model)
    t = naive_run(model, x, threshold=threshold, keep=keep, capture=True)
    n = x.shape[0]
    on2 = t["gate2"] != 0  # (N, 8) kernels of conv2
    on3 = t["gate3"] != 0  # (N, 10) kernels of conv3
    nodes = {node.name: node for node in graph.nodes}
    dense = sum(node.macs for node in graph.nodes) * n
    executed = dense
    c2, c3 = nodes["conv2"], nodes["conv3"]
    unit2 = c2.out_shapes[0][1] * c2.out_shapes[0][2] * 9
    unit3 = c3.out_shapes[0][1] * c3.out_shapes[0][2] * 9
    bn2 = nodes["bn2"]
    for i in range(n):
        # BN folded into conv2 runs on its computed channels only (counted per element).
        executed -= round(bn2.macs * (1 - on2[i].sum() / 8))
        executed -= c2.macs - unit2 * 6 * int(on2[i].sum())
        executed -= c3.macs - unit3 * int(on2[i].sum()) * int(on3[i].sum())
    return executed, dense


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [-20.0, 0.0, 20.0])
def test_mac_accounting_matches_masks(backend, offset):
    model = gated_cnn(3, gate="lkam", offset=offset)
    x = seeded_array(5, (3, 3, 10, 10))
    m = parsicore.load(model, backend=backend)
    m(x)
    executed, dense = _expected_macs(model, x)
    assert m.last_stats.macs_dense == dense
    assert m.last_stats.macs_executed == executed
    if offset < 0:
        assert m.last_stats.macs_fraction < 0.5
    if offset > 0:
        assert m.last_stats.macs_executed == dense


def test_all_kernels_off_gives_the_bias_only_logits():
    model = gated_cnn(1, gate="lkam", offset=-50.0)
    x = seeded_array(2, (2, 3, 10, 10))
    m = parsicore.load(model, backend="numpy")
    out = m(x)
    from parsicore.graph import Graph

    fc = {n.name: n for n in Graph.from_model_file(model).nodes}["fc"]
    np.testing.assert_allclose(out, np.broadcast_to(fc.weights["bias"], out.shape), atol=1e-6)
    gated = [layer for layer in m.last_stats.layers if layer.gated]
    assert [layer.kernels_on for layer in gated] == [0.0, 0.0]


def test_different_masks_per_image_in_one_batch():
    model = gated_cnn(11, gate="lkam", offset=0.0)
    x = seeded_array(12, (3, 3, 10, 10)) * np.array([0.1, 1.0, 5.0], dtype=np.float32)[:, None, None, None]
    masks = naive_run(model, x, capture=True)["gate2"]
    assert len({tuple(row != 0) for row in masks}) > 1, "test input should give different masks per image"
    for backend in backends():
        batched = parsicore.load(model, backend=backend)(x)
        single = np.concatenate([parsicore.load(model, backend=backend)(x[i:i + 1]) for i in range(3)])
        np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_gate_links_found_by_planner():
    m = parsicore.load(gated_cnn(0), backend="numpy")
    assert {s.name: s.gate_mask for s in m.plan.gated_steps} == {"conv2": "gate2", "conv3": "gate3"}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("gate", "mode", "skipped"), [("lkam", "hard", True), ("lkam", "scaled", False),
                                                     ("topk", "hard", True)])
def test_hard_mask_after_its_gated_conv_is_not_recomputed(backend, gate, mode, skipped):
    """A hard mask over the conv it gates multiplies by 1 where the conv computed and by 0 where it wrote 0:
    the plan lets it write over its input and the run skips it. Scaled masks still multiply. Either way the
    result is the naive dense-then-mask one."""
    model = gated_cnn(3, gate=gate, mode=mode, scaled=mode == "scaled")
    m = parsicore.load(model, backend=backend)
    calls = []
    for step in m.plan.steps:
        if step.op_type == "ChannelMask":
            assert m.plan.slot_of[step.inputs[0]] == m.plan.slot_of[step.outputs[0]]
            kernel = step.kernel
            object.__setattr__(step, "kernel", lambda ins, outs, _k=kernel, _n=step.name, **kw: (
                calls.append(_n), _k(ins, outs, **kw)))
    x = seeded_array(4, (2, 3, 10, 10))
    got = m(x)
    np.testing.assert_allclose(got, naive_run(model, x)["logits"], rtol=1e-4, atol=1e-4)
    assert calls == ([] if skipped else ["mask2", "mask3"])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x"])
def test_bad_threshold_is_an_input_error(bad):
    m = parsicore.load(gated_cnn(0), backend="numpy")
    with pytest.raises(InputError, match="threshold"):
        m(seeded_array(0, (1, 3, 10, 10)), threshold=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, 1.01])
def test_bad_keep_is_an_input_error(bad):
    m = parsicore.load(gated_cnn(0, gate="topk"), backend="numpy")
    with pytest.raises(InputError, match="keep"):
        m(seeded_array(0, (1, 3, 10, 10)), keep=bad)


def test_higher_threshold_runs_less():
    model = gated_cnn(4, gate="lkam", offset=0.0)
    x = seeded_array(9, (4, 3, 10, 10))
    m = parsicore.load(model, backend="numpy")
    fractions = []
    for t in (0.0, 0.3, 0.5, 0.7, 1.0):
        m(x, threshold=t)
        fractions.append(m.last_stats.macs_fraction)
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[-1] < fractions[0]


@given(seed=st.integers(0, 10_000), offset=st.sampled_from([-20.0, -1.0, 0.0, 1.0, 20.0]), batch=st.integers(1, 3),
       backend=st.sampled_from(backends()))
def test_channel_compact_chains_equal_naive(seed, offset, batch, backend):
    """MobileNetV2-style gated chains run channel-compact (expand -> dw by the same gate -> project, and a
    gated 3x3 -> 3x3): the plan marks exactly those layouts, and the result is the naive dense-then-mask one
    for any masks, every image its own (all on, all off, in between)."""
    from tests.models import gated_inverted_residual

    model = gated_inverted_residual(seed, offset=offset)
    m = parsicore.load(model, backend=backend)
    layouts = {step.name: (info.compact_in, info.compact_out) for step, info in zip(m.plan.steps, m._infos)
               if step.is_conv}
    assert layouts == {"stem": (False, False), "expand": (False, True), "dw": (True, True),
                       "project": (True, False), "conv": (False, True), "conv2": (True, False)}
    x = seeded_array(seed, (batch, 3, 8, 8))
    assume(not _near_decision(model, x, None, None))
    expected = naive_run(model, x)["logits"]
    np.testing.assert_allclose(m(x), expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_a_gated_conv_read_by_a_pool_stays_full():
    """conv2's masked output is read by a max-pool, which knows no compact layout: conv2 writes it whole."""
    m = parsicore.load(gated_cnn(0), backend="numpy")
    assert not any(info.compact_out or info.compact_in for info in m._infos)

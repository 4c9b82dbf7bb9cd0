"""The numba backend's packed GEMM (parsicore.kernels.numba_backend.packed_gemm) against a float64 reference:
the kernel alone (any shape, bias, activation, destination rows, threads, the packed weights of gathered rows
and columns), and Conv's dense and gated paths with it forced on at every shape."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels import factories
from parsicore.kernels.base import Activation, KernelSpec, apply_activation
from parsicore.ops.conv import ConvAttrs
from tests.ops._strategies_conv import (
    ConvCase,
    activations,
    channel_lists,
    constants_set,
    conv_cases,
    thread_context,
    winograd_cases,
    winograd_tile,
)
from tests.ops.test_conv import _compact, _expand, assert_close, expected, path_of, zero_inactive
from tests.strategies import seeded_array

packed_gemm = pytest.importorskip("parsicore.kernels.numba_backend.packed_gemm")
if not packed_gemm.available():
    pytest.skip("no packed GEMM on this machine (no vector FMA)", allow_module_level=True)


def packed_everywhere() -> contextlib.AbstractContextManager[None]:
    """Within the block, every conv GEMM takes the packed GEMM (the test shapes are far below its thresholds)."""
    return constants_set(packed_gemm, ENABLED=True, GATHERED=True, MAX_COLUMNS=1 << 62, MIN_DEPTH=0, MIN_WEIGHTS=0)


def test_micro_shape_per_cpu() -> None:
    """The tile follows the vector width: AVX-512 16x25, AVX2 16x6 (needs FMA), NEON 8x12, none without."""
    assert packed_gemm.micro_shape({"avx512f": True, "avx2": True, "fma": True}, "x86_64") == (16, 1, 25)
    assert packed_gemm.micro_shape({"avx2": True, "fma": True}, "x86_64") == (8, 2, 6)
    assert packed_gemm.micro_shape({"avx2": True}, "x86_64") is None
    assert packed_gemm.micro_shape({"neon": True}, "aarch64") == (4, 2, 12)
    assert packed_gemm.micro_shape({}, "riscv64") is None
    assert packed_gemm.MICRO.rows == packed_gemm.MICRO.lanes * packed_gemm.MICRO.vectors


def test_packed_gemm_is_on_where_it_was_measured_faster() -> None:
    """Dense and steps-in-place calls on AVX-512 and AVX2, gathered-and-packed gated calls on AVX-512 only, NEON and
    no tile BLAS only; the row GEMM (a 16-lane tile) only with the 16-lane packed GEMM."""
    shape = packed_gemm.MicroShape
    avx512, avx2, neon = shape(16, 1, 25), shape(8, 2, 6), shape(4, 2, 12)
    assert [packed_gemm.enabled_on(s) for s in (avx512, avx2, neon, None)] == [True, True, False, False]
    assert [packed_gemm.gathers_on(s) for s in (avx512, avx2, neon, None)] == [True, False, False, False]
    assert packed_gemm.ENABLED == packed_gemm.enabled_on(packed_gemm.MICRO)
    assert packed_gemm.GATHERED == packed_gemm.gathers_on(packed_gemm.MICRO)
    from parsicore.kernels.numba_backend import row_gemm

    assert row_gemm.ENABLED == (packed_gemm.ENABLED and packed_gemm.MICRO.lanes == 16)
    with constants_set(packed_gemm, ENABLED=True, GATHERED=False):
        assert packed_gemm.pays(512, 4608, 49) and not packed_gemm.gathered_pays(512, 4608, 49)
    with constants_set(packed_gemm, ENABLED=True, GATHERED=True):
        assert packed_gemm.gathered_pays(512, 4608, 49) and not packed_gemm.gathered_pays(512, 4608, 784)


def test_target_features_follow_numba_cpu_name() -> None:
    """The tile follows the CPU Numba compiles for: the host's features, or with NUMBA_CPU_NAME naming another CPU
    only those NUMBA_CPU_FEATURES lists (none: no x86 tile, BLAS only)."""
    host = {"avx512f": True, "avx2": True, "fma": True}
    assert packed_gemm.target_features(None, None, host) == host
    assert packed_gemm.target_features("host", None, host) == host
    assert packed_gemm.target_features("haswell", None, host) == {}
    assert packed_gemm.target_features("haswell", "+avx2,+fma,-avx512f", host) == {
        "avx2": True, "fma": True, "avx512f": False}
    assert packed_gemm.micro_shape(packed_gemm.target_features("generic", None, host), "x86_64") is None
    assert packed_gemm.micro_shape(packed_gemm.target_features("cortex-a72", None, {}), "aarch64") == (4, 2, 12)


@given(m=st.integers(1, 70), k=st.integers(1, 450), n=st.integers(1, 90), has_bias=st.booleans(),
       act=activations(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1),
       depth=st.sampled_from([None, 1, 7]), data=st.data())
def test_packed_gemm_matches_reference(m: int, k: int, n: int, has_bias: bool, act: Activation | None, threads: int,
                                       seed: int, depth: int | None, data: st.DataObject) -> None:
    """out[rows] = act(a @ b + bias[rows]) at every edge: rows past a panel, columns past a block, K blocks of
    1 and 7 steps, scattered destination rows (other rows untouched), 2 threads splitting the panels."""
    a = seeded_array(seed, (m, k))
    b = seeded_array(seed + 1, (k, n))
    spread = data.draw(st.booleans())
    total = m + (data.draw(st.integers(0, 5)) if spread else 0)
    rows = np.sort(np.random.default_rng(seed).choice(total, m, replace=False)).astype(np.int64) if spread else None
    bias = seeded_array(seed + 2, (total,)) if has_bias else None
    out = np.full((total, n), np.nan, dtype=np.float32)
    packed = packed_gemm.pack(a, depth)
    packed_gemm.packed_gemm(packed, m, b, out, bias, act, thread_context(threads), rows, parallel_macs=0)
    dest = np.arange(m) if rows is None else rows
    want = a.astype(np.float64) @ b.astype(np.float64) + (0.0 if bias is None else bias[dest, None])
    want = want.astype(np.float32)
    apply_activation(want, act)
    scale = float(max(1.0, np.abs(a.astype(np.float64) @ b).max()))
    np.testing.assert_allclose(out[dest], want, rtol=1e-4, atol=1e-4 * scale)
    untouched = np.setdiff1d(np.arange(total), dest)
    assert np.isnan(out[untouched]).all(), "rows outside ``rows`` must stay unwritten"


def naive_packed_layout(a: np.ndarray, block: int) -> np.ndarray:
    """The PackedWeights data of a (M, K), element by element from the documented layout (lanes past M 0)."""
    m, k = a.shape
    mr = packed_gemm.MICRO.rows
    panels = -(-m // mr)
    data = np.zeros(panels * k * mr, dtype=np.float32)
    for r in range(m):
        for t in range(k):
            b0 = (t // block) * block
            steps = min(block, k - b0)
            data[b0 * panels * mr + (r // mr) * steps * mr + (t - b0) * mr + r % mr] = a[r, t]
    return data


@given(m=st.integers(1, 40), k=st.integers(1, 60), block=st.sampled_from([1, 7, 192]), seed=st.integers(0, 2**32 - 1))
def test_pack_matches_naive_layout(m: int, k: int, block: int, seed: int) -> None:
    a = seeded_array(seed, (m, k))
    packed = packed_gemm.pack(a, block)
    assert (packed.rows, packed.depth, packed.block) == (m, k, block)
    np.testing.assert_array_equal(packed.data, naive_packed_layout(a, block))


@given(x=st.integers(1, 3), m=st.integers(1, 40), k=st.integers(1, 60), block=st.sampled_from([1, 7, 192]),
       seed=st.integers(0, 2**32 - 1))
def test_unpack_restores_the_matrix(x: int, m: int, k: int, block: int, seed: int) -> None:
    """unpack / unpack_slices invert pack / pack_slices (a conv keeping only packed weights rebuilds its plain ones
    from them for gated calls)."""
    a = seeded_array(seed, (x, m, k))
    np.testing.assert_array_equal(packed_gemm.unpack(packed_gemm.pack(a[0], block)), a[0])
    with constants_set(packed_gemm, DEPTH=block):
        np.testing.assert_array_equal(packed_gemm.unpack_slices(packed_gemm.pack_slices(a)), a)


@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 60), block=st.sampled_from([1, 7, 192]),
       act=activations(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_packed_gemm_on_selected_steps_matches_reference(m: int, k: int, n: int, block: int, act: Activation | None,
                                                         seed: int, data: st.DataObject) -> None:
    """``steps``: A[:, steps] @ b read in place from the dense packed weights (a conv gated by input channels
    only), whatever K blocks the selected steps fall in (some blocks empty, some whole)."""
    a = seeded_array(seed, (m, k))
    steps = np.sort(data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))).astype(np.int64)
    b = seeded_array(seed + 1, (steps.size, n))
    out = np.full((m, n), np.nan, dtype=np.float32)
    packed_gemm.packed_gemm(packed_gemm.pack(a, block), m, b, out, None, act, thread_context(1), steps=steps)
    want = (a[:, steps].astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    apply_activation(want, act)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * float(max(1.0, np.abs(want).max())))


@given(panels=st.integers(1, 3), k=st.integers(1, 400), block=st.sampled_from([1, 7, 40, 192]), data=st.data())
def test_step_selection_prefetches_what_is_read_next(panels: int, k: int, block: int, data: st.DataObject) -> None:
    """Each selected step's prefetch target is the weight step the GEMM reads PREFETCH_STEPS reads later: within
    a K block, panel after panel, each panel's selected steps in order (targets relative to the first panel's
    block start; a K block's panels lie one after another, one block width apart)."""
    m = (panels - 1) * packed_gemm.MICRO.rows + 1
    steps = np.sort(data.draw(st.lists(st.integers(0, k - 1), min_size=(k + 1) // 2, max_size=k,
                                       unique=True))).astype(np.int64)
    packed = packed_gemm.pack(seeded_array(0, (m, k)), block)
    starts, local = packed_gemm.step_selection(packed, steps)
    panels = packed_gemm.panel_count(m)
    ahead = packed_gemm.PREFETCH_STEPS
    for b0 in range(0, k, block):
        width = min(block, k - b0)
        chosen = [int(t) - b0 for t in steps if b0 <= t < b0 + width]
        b = b0 // block
        assert starts[b + 1] - starts[b] == len(chosen)
        reads = [p * width + t for p in range(panels) for t in chosen]  # the block's reads, in order
        for i, t in enumerate(chosen):
            at = 2 * (starts[b] + i)
            assert local[at] == t
            if i + ahead < len(reads):
                assert local[at + 1] == reads[i + ahead]


@given(k=st.integers(1, 40), c=st.integers(1, 12), taps=st.sampled_from([1, 4, 9]), seed=st.integers(0, 2**32 - 1),
       block=st.sampled_from([5, 192]), data=st.data())
def test_pack_gathered_matches_naive_gather(k: int, c: int, taps: int, seed: int, block: int,
                                            data: st.DataObject) -> None:
    """The packed weights of the active rows and columns: the layout of taps[rows][:, channels] flattened (a
    NumPy gather and the element-by-element layout as the reference), whatever the scratch held."""
    weights = seeded_array(seed, (k, c, taps))
    rows = data.draw(st.one_of(st.none(), channel_lists(k, 1).map(lambda lists: lists[0])))
    chans = data.draw(st.one_of(st.none(), channel_lists(c, 1).map(lambda lists: lists[0])))
    if rows is not None and rows.size == 0:
        rows = None
    use_rows = np.arange(k) if rows is None else rows
    use_chans = np.arange(c) if chans is None else chans
    gathered = weights[use_rows][:, use_chans].reshape(use_rows.size, -1)
    scratch = np.full(packed_gemm.packed_size(use_rows.size, gathered.shape[1]) + 3, np.nan, dtype=np.float32)
    with constants_set(packed_gemm, DEPTH=block):
        got = packed_gemm.pack_gathered(weights, rows, chans, scratch, thread_context(2))
    assert (got.rows, got.depth, got.block) == (use_rows.size, gathered.shape[1], block)
    np.testing.assert_array_equal(got.data, naive_packed_layout(gathered, block))


@given(x=st.integers(1, 5), m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 60),
       parallel=st.sampled_from([None, True]), seed=st.integers(0, 2**32 - 1))
def test_packed_gemm_slices_match_reference(x: int, m: int, k: int, n: int, parallel: bool | None, seed: int) -> None:
    """A stack of GEMMs (Winograd's slices) on weights packed per slice, serial or split over 2 threads."""
    u = seeded_array(seed, (x, m, k))
    b = seeded_array(seed + 1, (x, k, n))
    out = np.full((x, m, n), np.nan, dtype=np.float32)
    packed_gemm.packed_gemm_slices(packed_gemm.pack_slices(u), b, out, thread_context(2), parallel)
    want = np.matmul(u.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * float(max(1.0, np.abs(want).max())))


@given(channels=st.sets(st.integers(0, 300), max_size=40), taps=st.integers(1, 25))
def test_channel_steps_are_each_channels_taps_in_order(channels: set[int], taps: int) -> None:
    """The steps of the active input channels: c*T + t for each channel, then each tap, as the packed weights
    order them (c*T + t is im2col's row of channel c, tap t)."""
    chans = np.array(sorted(channels), dtype=np.int64)
    want = [c * taps + t for c in sorted(channels) for t in range(taps)]
    got = packed_gemm.channel_steps(chans, taps)
    assert got.dtype == np.int64
    assert got.tolist() == want


def test_packed_gemm_rejects_mismatched_operands() -> None:
    a = packed_gemm.pack(np.ones((20, 8), dtype=np.float32))
    out = np.empty((20, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="b must be"):
        packed_gemm.packed_gemm(a, 20, np.ones((7, 5), dtype=np.float32), out, None, None)
    with pytest.raises(ValueError, match="hold 20 rows"):
        packed_gemm.packed_gemm(a, 40, np.ones((8, 5), dtype=np.float32), out, None, None)
    for bad in ([3, 3], [5, 2], [-1, 2], [0, 8], []):  # repeated, descending, below 0, past K = 8, none
        with pytest.raises(ValueError, match="steps must be"):
            packed_gemm.packed_gemm(a, 20, np.ones((len(bad), 5), dtype=np.float32), out, None, None,
                                    steps=np.array(bad, dtype=np.int64))
    with pytest.raises(ValueError, match="rows must be"):
        packed_gemm.packed_gemm(a, 20, np.ones((8, 5), dtype=np.float32), out, None, None,
                                rows=np.arange(20, dtype=np.int64) + 1)


# --- Conv with the packed GEMM ----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@given(data=st.data())
def test_conv_packed_gemm_paths_match_reference(threads: int, data: st.DataObject) -> None:
    """im2col and 1x1 convs, dense and gated (rows, columns, both; full or channel-compact layouts), with the
    packed GEMM forced on: the weights packed at load, or the active rows and columns gathered per call."""
    kind = data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1"]))
    case = data.draw(conv_cases(kind))
    if kind == "im2col_gemm" and case.attrs.groups != 1:
        return
    n, c, k = case.x.shape[0], case.in_shape[0], case.out_shape[0]
    mode = data.draw(st.sampled_from(["dense", "rows", "columns", "both", "compact_in", "compact_out"]))
    active_out = data.draw(channel_lists(k, n)) if mode in ("rows", "both", "compact_out") else None
    active_in = data.draw(channel_lists(c, n)) if mode in ("columns", "both", "compact_in") else None
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(threads))
    with packed_everywhere():
        kernel = factories("numba")["Conv"](spec)
        assert kernel.gemm_panels is not None
        x = case.x
        if mode == "compact_in":
            x = _compact(case.x, active_in)
        elif active_in is not None:
            x = zero_inactive(case.x, active_in)
        y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
        kernel([x], [y], active_out=active_out, active_in=active_in, compact_in=mode == "compact_in",
               compact_out=mode == "compact_out")
    if mode == "compact_out":
        for i, rows in enumerate(active_out):
            assert np.isnan(y[i, rows.size:]).all(), "planes past the active channels must stay unwritten"
        y = _expand(y, active_out)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("threads", [1, 2])
@given(data=st.data())
def test_conv_winograd_packed_slices_match_reference(threads: int, tile: int, data: st.DataObject) -> None:
    """A dense Winograd conv (both tile sizes) with its transformed weights packed per slice; gated calls by input
    channels only read the active channels' steps of the packed slices in place, by rows or both keep BLAS on
    slices gathered from weights rebuilt from the packed ones."""
    case = data.draw(winograd_cases())
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(threads))
    with packed_everywhere(), winograd_tile(tile):
        kernel = factories("numba")["Conv"](spec)
    assert kernel.path == "winograd_3x3" and kernel.winograd_packed is not None
    y = np.full((case.x.shape[0], *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y])
    want, scale = expected(case)
    assert_close(y, want, scale)
    n = case.x.shape[0]
    mode = data.draw(st.sampled_from(["rows", "columns", "both"]))
    active_out = data.draw(channel_lists(case.out_shape[0], n)) if mode != "columns" else None
    active_in = data.draw(channel_lists(case.in_shape[0], n)) if mode != "rows" else None
    x = case.x if active_in is None else zero_inactive(case.x, active_in)
    kernel([x], [y], active_out=active_out, active_in=active_in)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)


@pytest.mark.parametrize("rule", ["this machine", "dense and in place", "gathered too"])
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_packed_gemm_at_late_layer_size(threads: int, rule: str) -> None:
    """A late-layer sized conv at the real thresholds (no forcing: 7x7 outputs, 256 -> 64 channels, K = 2304): the
    dense call takes the weights packed at load, a gated call (48 rows, 192 channels) the gathered ones, a call gated
    by 40 input channels only the steps read in place; all match the reference. Where the packed GEMM is not on
    (packed_gemm.ENABLED), BLAS runs and must match all the same. The rule as this machine has it, as on AVX2
    (dense and in place: the gathered call takes BLAS) and as on AVX-512 (gathered too)."""
    settings = {} if rule == "this machine" else {"ENABLED": True, "GATHERED": rule == "gathered too"}
    with constants_set(packed_gemm, **settings):
        _late_layer_conv(threads)


def _late_layer_conv(threads: int) -> None:
    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1)), seeded_array(60, (1, 256, 7, 7)),
                    seeded_array(61, (64, 256, 3, 3), scale=0.02), seeded_array(62, (64,)), Activation("relu"),
                    (64, 7, 7))
    assert path_of(case) == "im2col_gemm"
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(threads))
    kernel = factories("numba")["Conv"](spec)
    assert (kernel.gemm_panels is not None) == packed_gemm.ENABLED
    calls = []
    own = kernel.micro.packed_gemm

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(args[1])
        own.run(*args, **kwargs)

    kernel.micro = dataclasses.replace(kernel.micro, packed_gemm=dataclasses.replace(own, run=spy))
    y = np.full((1, *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y])
    want, scale = expected(case)
    assert_close(y, want, scale)
    rows = [np.sort(np.random.default_rng(63).choice(64, 48, replace=False)).astype(np.int64)]
    chans = [np.arange(64, 256, dtype=np.int64)]
    kernel([zero_inactive(case.x, chans)], [y], active_out=rows, active_in=chans)
    want, scale = expected(case, active_out=rows, active_in=chans)
    assert_close(y, want, scale)
    # Input channels only, few of them (64 x 40*9 weights, below the gathered threshold): steps read in place.
    few = [np.sort(np.random.default_rng(64).choice(256, 40, replace=False)).astype(np.int64)]
    kernel([zero_inactive(case.x, few)], [y], active_in=few)
    want, scale = expected(case, active_in=few)
    assert_close(y, want, scale)
    # The gathered call (48 rows, 192 channels) only where gated calls gather and pack (packed_gemm.GATHERED).
    assert calls == (([64, 48, 64] if packed_gemm.GATHERED else [64, 64]) if packed_gemm.ENABLED else [])

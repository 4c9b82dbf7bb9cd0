"""Pooling: attributes, output-size rule (PyTorch's ceil_mode rule), the naive reference against torch, and the
numpy/numba kernels against the reference (asymmetric pads, pads >= kernel, stride > kernel, ceil_mode)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels import factories
from parsicore.kernels.base import KernelSpec
from parsicore.ops.base import NoAttrs, parse_attrs
from parsicore.ops.pool import (
    AveragePoolAttrs,
    AveragePoolOp,
    GlobalAveragePoolOp,
    GlobalMaxPoolOp,
    MaxPoolAttrs,
    MaxPoolOp,
    pool_output_size,
)
from tests.ops._strategies_conv import PoolCase, pool_cases
from tests.strategies import backends, maybe_non_contiguous, seeded_array

OPS = {op.type: op for op in (MaxPoolOp(), AveragePoolOp(), GlobalAveragePoolOp(), GlobalMaxPoolOp())}
BACKENDS = backends()


def run_kernel(backend: str, op: str, attrs: object, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """The backend's output, starting from a NaN-filled output buffer."""
    spec = KernelSpec(op, attrs, {}, (tuple(x.shape[1:]),), (out_shape,), name="pool")
    y = np.full((x.shape[0], *out_shape), np.nan, dtype=np.float32)
    factories(backend)[op](spec)([x], [y])
    return y


# --- attributes and shapes ------------------------------------------------------------------------------


def test_attrs_parse_and_check() -> None:
    attrs = parse_attrs(AveragePoolAttrs, {"kernel": [3, 2], "pads": [1, 0, 1, 0], "count_include_pad": True})
    assert attrs == AveragePoolAttrs(kernel=(3, 2), pads=(1, 0, 1, 0), count_include_pad=True)
    assert attrs.strides == (3, 2)  # stride defaults to the kernel
    assert parse_attrs(MaxPoolAttrs, {"kernel": [3, 3], "stride": [1, 2]}).strides == (1, 2)
    for bad in ({"kernel": [0, 2]}, {"stride": [1, 0]}, {"pads": [0, 0, -1, 0]}, {"ceil_mode": 1},
                {"count_include_pad": True}):
        with pytest.raises(ValueError):
            parse_attrs(MaxPoolAttrs, bad)


def test_flags() -> None:
    for op in OPS.values():
        assert op.channelwise and op.keeps_zero
        assert op.macs(op.attrs(), [(3, 4, 4)], [(3, 2, 2)], {}) == 0


@pytest.mark.parametrize(("size", "kernel", "stride", "pads", "ceil_mode", "want"), [
    (7, 3, 2, (0, 0), False, 3),
    (8, 3, 2, (0, 0), False, 3),
    (8, 3, 2, (0, 0), True, 4),    # the ceil window starts at 6, inside the input
    (6, 2, 2, (1, 1), True, 4),    # (6+2-2)/2 = 3 -> ceil 4; last start 6 < 6+1: kept
    (5, 2, 2, (1, 1), True, 3),    # ceil((5+2-2)/2)+1 = 4, but window 3 starts at 6 >= 5+1: dropped
    (4, 3, 3, (0, 2), False, 2),
    (1, 1, 1, (3, 0), False, 4),   # windows of padding only (they give 0)
])
def test_pool_output_size(size: int, kernel: int, stride: int, pads: tuple[int, int], ceil_mode: bool,
                          want: int) -> None:
    assert pool_output_size(size, kernel, stride, pads[0], pads[1], ceil_mode) == want


def test_infer() -> None:
    attrs = MaxPoolAttrs(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1))
    assert OPS["MaxPool"].infer(attrs, [(8, 9, 9)], {}) == [(8, 5, 5)]
    assert OPS["GlobalAveragePool"].infer(NoAttrs(), [(8, 9, 7)], {}) == [(8, 1, 1)]
    assert OPS["GlobalMaxPool"].infer(NoAttrs(), [(8, 9, 7)], {}) == [(8, 1, 1)]
    with pytest.raises(ValueError):
        OPS["MaxPool"].infer(MaxPoolAttrs(kernel=(4, 4)), [(8, 3, 9)], {})  # kernel taller than the input
    with pytest.raises(ValueError):
        OPS["AveragePool"].infer(AveragePoolAttrs(), [(8, 9)], {})
    with pytest.raises(ValueError):
        OPS["GlobalMaxPool"].infer(NoAttrs(), [(8,)], {})


def test_reference_average_divisors_by_hand() -> None:
    """2x2 windows, stride 2, pads (1, 1, 1, 1) over a 3x3 ones image: corner windows hold 1 input element."""
    x = np.ones((1, 1, 3, 3), dtype=np.float32)
    x[0, 0, 1, 1] = 5.0
    (valid,) = OPS["AveragePool"].reference(AveragePoolAttrs(kernel=(2, 2), pads=(1, 1, 1, 1)), [x], {})
    np.testing.assert_allclose(valid[0, 0], [[1, 1], [1, 2]])  # bottom-right: (5 + 1 + 1 + 1) / 4
    (incl,) = OPS["AveragePool"].reference(
        AveragePoolAttrs(kernel=(2, 2), pads=(1, 1, 1, 1), count_include_pad=True), [x], {})
    np.testing.assert_allclose(incl[0, 0], [[0.25, 0.5], [0.5, 2]])
    (mx,) = OPS["MaxPool"].reference(MaxPoolAttrs(kernel=(2, 2), pads=(1, 1, 1, 1)), [-x], {})
    np.testing.assert_allclose(mx[0, 0], [[-1, -1], [-1, -1]])  # padding is not a 0 candidate


# --- reference vs torch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@given(data=st.data())
def test_reference_matches_torch(op: str, data: st.DataObject) -> None:
    torch = pytest.importorskip("torch")
    case = data.draw(pool_cases(op, torch_compatible=True))
    a = case.attrs
    x = torch.from_numpy(np.array(case.x))
    pad = (a.pads[0], a.pads[1])
    if op == "MaxPool":
        want = torch.nn.functional.max_pool2d(x, a.kernel, a.strides, pad, ceil_mode=a.ceil_mode)
    else:
        want = torch.nn.functional.avg_pool2d(x, a.kernel, a.strides, pad, ceil_mode=a.ceil_mode,
                                              count_include_pad=a.count_include_pad)
    (got,) = OPS[op].reference(a, [case.x], {})
    assert OPS[op].infer(a, [case.x.shape[1:]], {}) == [tuple(want.shape[1:])]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**16), shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 9),
                                                    st.integers(1, 9)))
def test_global_reference_matches_torch(seed: int, shape: tuple[int, int, int, int]) -> None:
    torch = pytest.importorskip("torch")
    x = seeded_array(seed, shape)
    (avg,) = OPS["GlobalAveragePool"].reference(NoAttrs(), [x], {})
    (mx,) = OPS["GlobalMaxPool"].reference(NoAttrs(), [x], {})
    t = torch.from_numpy(x)
    np.testing.assert_allclose(avg, torch.nn.functional.adaptive_avg_pool2d(t, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx, torch.nn.functional.adaptive_max_pool2d(t, 1).numpy(), rtol=0, atol=0)


# --- kernels vs reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=pool_cases("MaxPool"))
def test_max_pool_matches_reference(backend: str, case: PoolCase) -> None:
    (want,) = OPS["MaxPool"].reference(case.attrs, [case.x], {})
    np.testing.assert_array_equal(run_kernel(backend, "MaxPool", case.attrs, case.x, case.out_shape), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", [dict(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),
                                      dict(kernel=(2, 2), stride=(2, 2)), dict(kernel=(3, 3), stride=(2, 1)),
                                      dict(kernel=(2, 2), stride=(1, 2), pads=(0, 1, 1, 0))])
@given(seed=st.integers(0, 2**16), h=st.integers(3, 40), w=st.integers(3, 70))
def test_max_pool_stride_two_rows_match_reference(backend: str, geometry: dict, seed: int, h: int, w: int) -> None:
    """2x2 and 3x3 windows at column stride 2 (ResNet's stem pool, the small CNNs' pools), whose interior rows
    the numba kernel reads with a literal stride, at widths with many interior windows, against the reference."""
    attrs = MaxPoolAttrs(**geometry)
    x = seeded_array(seed, (1, 3, h, w))
    (want,) = OPS["MaxPool"].reference(attrs, [x], {})
    np.testing.assert_array_equal(run_kernel(backend, "MaxPool", attrs, x, want.shape[1:]), want)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=pool_cases("AveragePool"))
def test_average_pool_matches_reference(backend: str, case: PoolCase) -> None:
    (want,) = OPS["AveragePool"].reference(case.attrs, [case.x], {})
    got = run_kernel(backend, "AveragePool", case.attrs, case.x, case.out_shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@given(seed=st.integers(0, 2**16), non_contiguous=st.booleans(),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 16), st.integers(1, 12), st.integers(1, 12)))
def test_global_pool_matches_reference(backend: str, op: str, seed: int, non_contiguous: bool,
                                       shape: tuple[int, int, int, int]) -> None:
    x = maybe_non_contiguous(seeded_array(seed, shape), non_contiguous)
    (want,) = OPS[op].reference(NoAttrs(), [x], {})
    got = run_kernel(backend, op, NoAttrs(), x, (shape[1], 1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_windows_of_padding_only_give_zero(backend: str, op: str) -> None:
    """pads >= kernel: the first windows hold no input element; both pools give 0 there, never -inf or NaN."""
    attrs = MaxPoolAttrs(kernel=(2, 2), pads=(4, 0, 0, 4)) if op == "MaxPool" else AveragePoolAttrs(
        kernel=(2, 2), pads=(4, 0, 0, 4))
    x = -np.abs(seeded_array(9, (2, 3, 4, 4))) - 1.0
    (out_shape,) = OPS[op].infer(attrs, [(3, 4, 4)], {})
    got = run_kernel(backend, op, attrs, x, out_shape)
    assert out_shape == (3, 4, 4)
    np.testing.assert_array_equal(got[:, :, :2], 0.0)
    np.testing.assert_array_equal(got[:, :, :, 2:], 0.0)
    assert (got[:, :, 2:, :2] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"])
def test_zero_channel_stays_zero(backend: str, op: str) -> None:
    """keeps_zero: an all-zero input channel gives an all-zero output channel."""
    windowed = {"MaxPool": MaxPoolAttrs(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1), ceil_mode=True),
                "AveragePool": AveragePoolAttrs(kernel=(3, 3), pads=(1, 2, 1, 0), count_include_pad=True)}
    attrs = windowed.get(op, NoAttrs())
    x = seeded_array(10, (2, 4, 7, 7))
    x[:, 2] = 0.0
    (out_shape,) = OPS[op].infer(attrs, [(4, 7, 7)], {})
    got = run_kernel(backend, op, attrs, x, out_shape)
    np.testing.assert_array_equal(got[:, 2], 0.0)
    assert (got[:, [0, 1, 3]] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("geometry", [dict(kernel=(2, 2)), dict(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),
                                      dict(kernel=(3, 2), stride=(1, 3), pads=(0, 2, 1, 0), ceil_mode=True)])
def test_nan_and_infinity_as_the_reference(backend: str, op: str, geometry: dict) -> None:
    """NaN anywhere in a window gives NaN, +-inf win or lose as numbers, the windows around them unchanged:
    the numba max pool compares with a vectorisable select and redoes rows holding a NaN."""
    attrs = MaxPoolAttrs(**geometry) if op == "MaxPool" else AveragePoolAttrs(**geometry)
    x = seeded_array(11, (2, 3, 9, 11))
    x[0, 0, 2, 4] = np.nan  # inside a window of every geometry here
    x[0, 0, 0, 0] = np.nan  # on an edge window
    x[1, 2, 4, 10] = np.inf
    x[1, 1, 5, 5] = -np.inf
    x[1, 1, 8, 0] = np.nan
    x[1, 2, 3, 2] = np.nan  # a first tap of a window row
    x[1, 0, 5, 7] = np.nan  # the last tap of a 2x2 and of a 3x3 window (the direct kernels check every tap)
    (out_shape,) = OPS[op].infer(attrs, [(3, 9, 11)], {})
    want = OPS[op].reference(attrs, [x], {})[0]
    got = run_kernel(backend, op, attrs, x, out_shape)
    assert np.isnan(want).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # NaN where want is NaN, nowhere else


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool_nan_and_infinity_as_the_reference(backend: str, op: str) -> None:
    x = seeded_array(12, (2, 4, 5, 6))
    x[0, 1, 3, 2] = np.nan
    x[1, 0, 0, 0] = np.nan  # a row's first element
    x[1, 2, 4, 5] = np.inf
    x[1, 3, 2, 2] = -np.inf
    want = OPS[op].reference(NoAttrs(), [x], {})[0]
    got = run_kernel(backend, op, NoAttrs(), x, (4, 1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_numba_backend_runs_its_own_pools_at_every_size() -> None:
    """The numba pools beat NumPy's whole-tensor passes from the smallest maps on (PERFORMANCE.md): no size bar."""
    pytest.importorskip("numba")
    small = KernelSpec("MaxPool", MaxPoolAttrs(kernel=(2, 2)), {}, ((4, 10, 10),), ((4, 5, 5),))
    assert factories("numba")["MaxPool"](small).__module__.endswith("numba_backend.pool")
    small_average = KernelSpec("AveragePool", AveragePoolAttrs(kernel=(2, 2)), {}, ((4, 10, 10),), ((4, 5, 5),))
    assert factories("numba")["AveragePool"](small_average).__module__.endswith("numba_backend.pool")

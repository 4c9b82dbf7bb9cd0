"""Gemm: shape/MAC rules, the naive reference against torch, and the fast kernels against the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels import factories
from parsicore.kernels.base import Activation, KernelSpec, apply_activation
from parsicore.ops.base import NoAttrs, parse_attrs
from parsicore.ops.gemm import GemmOp
from tests.ops._strategies_conv import activations
from tests.strategies import backends, maybe_non_contiguous, seeded_array

GEMM = GemmOp()
BACKENDS = backends()
GemmCase = tuple[np.ndarray, dict[str, np.ndarray], Activation | None]  # x (N, F), weights, epilogue


def test_infer_and_macs() -> None:
    assert GEMM.infer(NoAttrs(), [(12,)], {"weight": (5, 12), "bias": (5,)}) == [(5,)]
    assert GEMM.macs(NoAttrs(), [(12,)], [(5,)], {"weight": (5, 12)}) == 60
    assert parse_attrs(NoAttrs, {}) == NoAttrs()
    with pytest.raises(ValueError):
        parse_attrs(NoAttrs, {"transB": 1})


@pytest.mark.parametrize(("in_shape", "weights"), [
    ((12,), {"weight": (5, 11)}),               # F mismatch
    ((12,), {"weight": (12, 5)}),               # transposed weight
    ((12,), {"weight": (5, 12, 1)}),            # weight rank
    ((12,), {"weight": (5, 12), "bias": (4,)}),  # bias length
    ((3, 4), {"weight": (5, 12)}),              # input not flattened
])
def test_infer_rejects_inconsistent_shapes(in_shape: tuple[int, ...], weights: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        GEMM.infer(NoAttrs(), [in_shape], weights)


@st.composite
def gemm_cases(draw: st.DrawFn) -> GemmCase:
    n, f, k = draw(st.integers(1, 4)), draw(st.integers(1, 64)), draw(st.integers(1, 32))
    seed = draw(st.integers(0, 2**32 - 1))
    x = maybe_non_contiguous(seeded_array(seed, (n, f)), draw(st.booleans()))
    weights = {"weight": seeded_array(seed + 1, (k, f), scale=1 / np.sqrt(f))}
    if draw(st.booleans()):
        weights["bias"] = seeded_array(seed + 2, (k,))
    return x, weights, draw(activations())


@given(case=gemm_cases())
def test_reference_matches_torch(case: GemmCase) -> None:
    torch = pytest.importorskip("torch")
    x, weights, _ = case
    bias = weights.get("bias")
    want = torch.nn.functional.linear(torch.from_numpy(np.array(x)), torch.from_numpy(weights["weight"]),
                                      None if bias is None else torch.from_numpy(bias)).numpy()
    (got,) = GEMM.reference(NoAttrs(), [x], weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=gemm_cases())
def test_gemm_matches_reference(backend: str, case: GemmCase) -> None:
    x, weights, act = case
    k, f = weights["weight"].shape
    (want,) = GEMM.reference(NoAttrs(), [x], weights)
    apply_activation(want, act)
    spec = KernelSpec("Gemm", NoAttrs(), weights, ((f,),), ((k,),), activation=act, name="fc")
    y = np.full((x.shape[0], k), np.nan, dtype=np.float32)
    factories(backend)["Gemm"](spec)([x], [y])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)

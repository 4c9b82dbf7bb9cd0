"""Hypothesis strategies shared by the op, gate and model tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def float32_arrays(shape: tuple[int, ...], lo: float = -2.0, hi: float = 2.0) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays of ``shape`` with finite values in [lo, hi] (no NaN/inf, no subnormals)."""
    return hnp.arrays(np.float32, shape, elements=st.floats(lo, hi, width=32, allow_subnormal=False))


def seeded_array(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """A reproducible standard-normal float32 array (cheaper than drawing every element)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def backends() -> list[str]:
    """Fast backends present here: numpy always, numba when importable."""
    from parsicore.kernels import numba_available

    return ["numpy", "numba"] if numba_available() else ["numpy"]


def maybe_non_contiguous(x: np.ndarray, flag: bool) -> np.ndarray:
    """When flag, the same values as a non-contiguous view (every other element of a doubled array)."""
    if not flag:
        return x
    big = np.zeros(x.shape[:-1] + (x.shape[-1] * 2,), dtype=x.dtype)
    big[..., ::2] = x
    view = big[..., ::2]
    assert not view.flags.c_contiguous or x.shape[-1] <= 1
    return view

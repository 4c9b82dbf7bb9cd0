"""Helpers shared by the tests of the small op families (activation ... softmax, gates)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from parsicore.kernels.base import Activation, KernelSpec
from parsicore.ops import OPS
from parsicore.ops.base import Attrs, parse_attrs
from tests.strategies import maybe_non_contiguous, seeded_array

batches = st.integers(1, 3)
#: Whether to hand a kernel a non-contiguous view of its input.
strided = st.booleans()
seeds = st.integers(0, 2**31 - 1)


@st.composite
def image_shapes(draw: st.DrawFn, max_channels: int = 6, max_side: int = 6) -> tuple[int, int, int]:
    """Feature shapes (C, H, W), 1x1 spatial included."""
    return (draw(st.integers(1, max_channels)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))


@st.composite
def feature_shapes(draw: st.DrawFn, min_rank: int = 1, max_rank: int = 4, max_side: int = 5) -> tuple[int, ...]:
    """Feature shapes of any rank in [min_rank, max_rank] with sides 1..max_side."""
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=min_rank, max_size=max_rank)))


def batched_input(seed: int, n: int, feature_shape: tuple[int, ...], flag: bool, scale: float = 2.0) -> np.ndarray:
    """A float32 (n, *feature_shape) input, as a non-contiguous view when ``flag``."""
    return maybe_non_contiguous(seeded_array(seed, (n, *feature_shape), scale), flag)


def out_shapes(op_type: str, attrs: Attrs, inputs: Sequence[np.ndarray],
               weights: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    """The op's inferred output feature shapes for these inputs and weights."""
    in_shapes = tuple(tuple(x.shape[1:]) for x in inputs)
    shapes = OPS[op_type].infer(attrs, in_shapes, {k: tuple(v.shape) for k, v in weights.items()})
    return tuple(tuple(s) for s in shapes)


def run_kernel(factories: Mapping[str, Any], op_type: str, attrs: Attrs, inputs: Sequence[np.ndarray],
               weights: Mapping[str, np.ndarray] | None = None,
               activation: Activation | None = None) -> list[np.ndarray]:
    """Build the kernel of ``op_type`` from ``factories`` and run it once on ``inputs``.

    Outputs start as NaN (garbage) so a kernel that leaves an element unwritten fails; inputs are checked
    to come back unmodified.
    """
    weights = dict(weights or {})
    in_shapes = tuple(tuple(x.shape[1:]) for x in inputs)
    shapes = out_shapes(op_type, attrs, inputs, weights)
    spec = KernelSpec(op=op_type, attrs=attrs, weights=weights, in_shapes=in_shapes, out_shapes=shapes,
                      activation=activation)
    kernel = factories[op_type](spec)
    before = [x.copy() for x in inputs]
    n = inputs[0].shape[0]
    outputs = [np.full((n, *s), np.nan, dtype=np.float32) for s in shapes]
    kernel(inputs, outputs)
    for x, x0 in zip(inputs, before):
        np.testing.assert_array_equal(x, x0, err_msg="kernel modified its input")
    return outputs


def reference(op_type: str, attrs: Attrs, inputs: Sequence[np.ndarray],
              weights: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The op's naive reference, checked to return the inferred shapes as float32."""
    weights = dict(weights or {})
    results = OPS[op_type].reference(attrs, inputs, weights)
    shapes = out_shapes(op_type, attrs, inputs, weights)
    n = inputs[0].shape[0]
    assert [r.shape for r in results] == [(n, *s) for s in shapes]
    assert all(r.dtype == np.float32 for r in results)
    return results


def attrs_of(op_type: str, **raw: Any) -> Attrs:
    """Attributes of ``op_type`` parsed from keyword arguments as the graph would."""
    return parse_attrs(OPS[op_type].attrs, raw)

"""NumPy kernel of the numerically stable softmax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation
from parsicore.ops.softmax import full_axis


def make_softmax(spec: KernelSpec) -> Kernel:
    """x: float32 (N, ...) -> float32 (N, ...), normalised along the attribute's axis."""
    axis = full_axis(spec.attrs.axis, len(spec.in_shapes[0]))
    epilogue = spec.activation

    def softmax(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        out = outputs[0]
        # Subtracting the max makes every exponent <= 0: no overflow, and the largest term is exactly 1. The
        # subtraction itself overflows only to -inf (x - max < -3.4e38), whose exp is 0: the exact limit.
        with np.errstate(over="ignore"):
            np.subtract(inputs[0], inputs[0].max(axis=axis, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=axis, keepdims=True)
        apply_activation(out, epilogue)

    return softmax


FACTORIES = {"Softmax": make_softmax}

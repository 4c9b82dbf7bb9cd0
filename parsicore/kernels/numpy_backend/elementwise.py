"""NumPy kernels of Add and Mul with a second input or a constant weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation
from parsicore.ops.elementwise import align_batched

_UFUNCS = {"Add": np.add, "Mul": np.multiply}


def make_binary(spec: KernelSpec) -> Kernel:
    """a: float32 (N, *A), b: float32 (N, *B) or the weight ``constant`` (*B) -> float32 (N, *A)."""
    ufunc = _UFUNCS[spec.op]
    feature_rank = len(spec.in_shapes[0])
    constant = spec.weights.get("constant")
    if constant is not None:
        constant = np.ascontiguousarray(constant, dtype=np.float32)
    epilogue = spec.activation

    def binary(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        other = constant if len(inputs) == 1 else align_batched(inputs[1], feature_rank)
        ufunc(inputs[0], other, out=outputs[0])
        apply_activation(outputs[0], epilogue)

    return binary


FACTORIES = {"Add": make_binary, "Mul": make_binary}

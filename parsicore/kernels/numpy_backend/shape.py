"""NumPy kernels of Flatten, Reshape, Identity and Dropout: copies in C order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation


def make_copy(spec: KernelSpec) -> Kernel:
    """x: float32 (N, *S) -> float32 (N, *T) with prod(S) == prod(T), values in C order."""
    epilogue = spec.activation

    def copy(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        out = outputs[0]
        # Reshaping the contiguous output (always a view) rather than the input (a copy when the input
        # is a strided view) saves one pass over the data.
        np.copyto(out.reshape(inputs[0].shape), inputs[0])
        apply_activation(out, epilogue)

    return copy


FACTORIES = {"Flatten": make_copy, "Reshape": make_copy, "Identity": make_copy, "Dropout": make_copy}

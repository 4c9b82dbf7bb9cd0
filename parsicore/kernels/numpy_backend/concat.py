"""NumPy kernel of channel concatenation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation


def make_concat(spec: KernelSpec) -> Kernel:
    """inputs: float32 (N, C_i, *S) -> float32 (N, sum C_i, *S)."""
    epilogue = spec.activation

    def concat(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        np.concatenate(inputs, axis=1, out=outputs[0])
        apply_activation(outputs[0], epilogue)

    return concat


FACTORIES = {"Concat": make_concat}

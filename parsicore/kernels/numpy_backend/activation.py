"""NumPy kernels of the element-wise activations: copy, then the shared epilogue ``apply_activation``.

Going through :func:`~parsicore.kernels.base.apply_activation` keeps a standalone activation bit-identical
to the same activation fused into a Conv/Gemm epilogue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation
from parsicore.ops.activation import OPS

_OPS_BY_TYPE = {op.type: op for op in OPS}


def make_activation(spec: KernelSpec) -> Kernel:
    """x: float32 (N, ...) -> act(x): float32 (N, ...)."""
    act = _OPS_BY_TYPE[spec.op].to_activation(spec.attrs)
    epilogue = spec.activation

    def activation(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        out = outputs[0]
        np.copyto(out, inputs[0])
        apply_activation(out, act)
        apply_activation(out, epilogue)

    return activation


FACTORIES = {op.type: make_activation for op in OPS}

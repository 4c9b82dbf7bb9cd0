"""NumPy kernel of inference BatchNorm as one multiply-add per element: y = a[c] * x + b[c]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation
from parsicore.ops.batchnorm import bn_scale_shift


def make_batchnorm(spec: KernelSpec) -> Kernel:
    """x: float32 (N, C, H, W) or (N, C) -> same shape. ValueError on a negative variance."""
    w = spec.weights
    a, b = bn_scale_shift(w["scale"], w["bias"], w["mean"], w["var"], spec.attrs.epsilon)
    # (C,) -> (C, 1, 1) for images so the per-channel factors broadcast over H and W.
    trailing = (1,) * (len(spec.in_shapes[0]) - 1)
    a32 = a.astype(np.float32).reshape(a.shape + trailing)
    b32 = b.astype(np.float32).reshape(b.shape + trailing)
    epilogue = spec.activation

    def batchnorm(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        out = outputs[0]
        np.multiply(inputs[0], a32, out=out)
        np.add(out, b32, out=out)
        apply_activation(out, epilogue)

    return batchnorm


FACTORIES = {"BatchNorm": make_batchnorm}

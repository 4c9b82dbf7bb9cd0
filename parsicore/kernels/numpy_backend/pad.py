"""NumPy kernel of constant spatial padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import Kernel, KernelSpec, apply_activation


def make_pad(spec: KernelSpec) -> Kernel:
    """x: float32 (N, C, H, W) -> float32 (N, C, top + H + bottom, left + W + right)."""
    top, left, bottom, right = spec.attrs.pads
    _, height, width = spec.in_shapes[0]
    value = np.float32(spec.attrs.value)
    epilogue = spec.activation

    def pad(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        out = outputs[0]
        # Write only the four border strips: the interior is overwritten by the copy anyway.
        out[:, :, :top] = value
        out[:, :, top + height:] = value
        out[:, :, top:top + height, :left] = value
        out[:, :, top:top + height, left + width:] = value
        out[:, :, top:top + height, left:left + width] = inputs[0]
        apply_activation(out, epilogue)

    return pad


FACTORIES = {"Pad": make_pad}

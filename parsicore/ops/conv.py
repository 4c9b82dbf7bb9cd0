"""Conv: 2-D convolution over NCHW images, with groups, dilation and asymmetric padding (ONNX semantics).

x: float32 (N, C, H, W); weight: (K, C/groups, kh, kw); optional bias: (K,) -> y: float32 (N, K, Ho, Wo) with
``Ho = (H + top + bottom - dil_h*(kh-1) - 1) // stride_h + 1`` (likewise Wo). Output channel k reads only the
input channels of its group ``k // (K/groups)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from parsicore.ops.base import Attrs, OpDef, Shape, require_rank


@dataclass(frozen=True)
class ConvAttrs(Attrs):
    """stride/dilation: (h, w); pads: (top, left, bottom, right); kernel: (kh, kw) or None (taken from the weight)."""

    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    kernel: tuple[int, int] | None = None

    def check(self) -> None:
        if min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if min(self.dilation) < 1:
            raise ValueError(f"dilation must be >= 1, got {self.dilation}")
        if min(self.pads) < 0:
            raise ValueError(f"pads must be >= 0, got {self.pads}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.kernel is not None and min(self.kernel) < 1:
            raise ValueError(f"kernel must be >= 1, got {self.kernel}")


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    """Output length along one axis; ValueError when the (dilated) kernel does not fit the padded input."""
    extent = dilation * (kernel - 1) + 1
    padded = size + pad_begin + pad_end
    if padded < extent:
        raise ValueError(f"kernel extent {extent} is larger than the padded input {padded}")
    return (padded - extent) // stride + 1


class ConvOp(OpDef):
    type = "Conv"
    attrs = ConvAttrs
    weights = ("weight",)
    optional_weights = ("bias",)
    #: The kernels take ``active_out``/``active_in`` channel lists and skip the work they exclude.
    supports_gating: ClassVar[bool] = True

    def infer(self, attrs: ConvAttrs, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        (shape,) = in_shapes
        require_rank(shape, 3)
        c, h, w = shape
        wshape = tuple(weights["weight"])
        if len(wshape) != 4:
            raise ValueError(f"weight 'weight' must have 4 dimensions (K, C/groups, kh, kw), got shape {wshape}")
        k, cg, kh, kw = wshape
        g = attrs.groups
        if c % g != 0:
            raise ValueError(f"input channels {c} are not divisible by groups {g}")
        if k % g != 0:
            raise ValueError(f"output channels {k} are not divisible by groups {g}")
        if cg != c // g:
            raise ValueError(f"weight 'weight' has {cg} input channels per group, expected {c // g} (groups={g})")
        if min(wshape) < 1:
            raise ValueError(f"weight 'weight' has an empty dimension: {wshape}")
        if attrs.kernel is not None and tuple(attrs.kernel) != (kh, kw):
            raise ValueError(f"kernel {tuple(attrs.kernel)} does not match the weight's kernel {(kh, kw)}")
        if "bias" in weights and tuple(weights["bias"]) != (k,):
            raise ValueError(f"weight 'bias' has shape {tuple(weights['bias'])}, expected {(k,)}")
        top, left, bottom, right = attrs.pads
        ho = conv_output_size(h, kh, attrs.stride[0], attrs.dilation[0], top, bottom)
        wo = conv_output_size(w, kw, attrs.stride[1], attrs.dilation[1], left, right)
        return [(k, ho, wo)]

    def macs(self, attrs: ConvAttrs, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        k, cg, kh, kw = weights["weight"]
        _, ho, wo = out_shapes[0]
        return int(k * ho * wo * cg * kh * kw)

    def reference(self, attrs: ConvAttrs, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Loop over output positions; each one is the dot product of its window with every filter (float64)."""
        x = np.asarray(inputs[0], dtype=np.float64)
        weight = np.asarray(weights["weight"], dtype=np.float64)
        n, c, h, w = x.shape
        k, cg, kh, kw = weight.shape
        g = attrs.groups
        sh, sw = attrs.stride
        dh, dw = attrs.dilation
        top, left, bottom, right = attrs.pads
        ho = conv_output_size(h, kh, sh, dh, top, bottom)
        wo = conv_output_size(w, kw, sw, dw, left, right)
        padded = np.zeros((n, c, h + top + bottom, w + left + right))
        padded[:, :, top:top + h, left:left + w] = x
        # Filters and windows split by group: filter (g, K/g, C/g, kh, kw), window (N, g, C/g, kh, kw).
        filters = weight.reshape(g, k // g, cg, kh, kw)
        y = np.zeros((n, k, ho, wo))
        for oh in range(ho):
            for ow in range(wo):
                h0, w0 = oh * sh, ow * sw
                window = padded[:, :, h0:h0 + dh * (kh - 1) + 1:dh, w0:w0 + dw * (kw - 1) + 1:dw]
                window = window.reshape(n, g, cg, kh, kw)
                y[:, :, oh, ow] = np.einsum("ngcij,gkcij->ngk", window, filters).reshape(n, k)
        if weights.get("bias") is not None:
            y += np.asarray(weights["bias"], dtype=np.float64)[None, :, None, None]
        return [y.astype(np.float32)]


OPS: tuple[OpDef, ...] = (ConvOp(),)

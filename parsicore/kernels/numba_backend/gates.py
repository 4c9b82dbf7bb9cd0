"""ChannelMask with Numba: per (image, channel) a copy, a zero fill or a multiply, whichever the mask value asks.

Hard masks are 0/1, and a gated conv has already written its inactive channels as 0, so most of the
NumPy kernel's multiply is a copy or a rewrite of zeros; here channel c of image n is zero-filled when
mask[n, c] == 0, copied when it is 1, multiplied otherwise (scaled masks). Small inputs (below
:data:`NUMPY_BELOW` elements per image) and masks with a fused activation keep the NumPy kernel. The
gate kernels themselves (LKAM, top-k) stay NumPy: small matmuls on pooled vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from parsicore.kernels import numpy_backend
from parsicore.kernels.base import Kernel, KernelContext, KernelSpec
from parsicore.kernels.numba_backend.parallel import serial_and_parallel

#: Below this many elements per image NumPy's single multiply is as fast as the per-channel loop.
NUMPY_BELOW = 100_000


@serial_and_parallel
def _channel_mask_kernel(x, mask, out):
    """x: float32 (N, C, P); mask: float32 (N, C) -> out: float32 (N, C, P) = x * mask[:, :, None]."""
    n_images, c_count, p = x.shape
    for task in numba.prange(n_images * c_count):
        n = task // c_count
        c = task % c_count
        m = mask[n, c]
        dst = out[n, c]
        if m == 0.0:
            dst[:] = 0.0
        elif m == 1.0:
            src = x[n, c]
            for i in range(p):
                dst[i] = src[i]
        else:
            src = x[n, c]
            for i in range(p):
                dst[i] = src[i] * m


def make_channel_mask(spec: KernelSpec) -> Kernel:
    """Factory. x: float32 (N, C, ...), mask: float32 (N, C) -> x * mask per channel."""
    features = int(np.prod(spec.in_shapes[0]))
    if spec.activation is not None or features < NUMPY_BELOW or len(spec.in_shapes[0]) < 2:
        return numpy_backend.gates.make_channel_mask(spec)
    c = spec.in_shapes[0][0]
    context: KernelContext = spec.kernel_context()

    def channel_mask(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        x, mask = inputs
        n = x.shape[0]
        x3 = np.ascontiguousarray(x, dtype=np.float32).reshape(n, c, -1)
        mask = np.ascontiguousarray(mask, dtype=np.float32).reshape(n, c)
        out = outputs[0]
        _channel_mask_kernel(context.threads, out.size, x3, mask, out.reshape(n, c, -1))

    return channel_mask


FACTORIES = {"ChannelMask": make_channel_mask}

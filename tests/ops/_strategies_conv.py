"""Hypothesis strategies for Conv, pooling and Gemm cases: shapes, attributes, activations, gating lists."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from parsicore.kernels.base import ACTIVATION_KINDS, Activation, KernelContext
from parsicore.kernels.numpy_backend import winograd
from parsicore.ops.conv import ConvAttrs, conv_output_size
from parsicore.ops.pool import AveragePoolAttrs, MaxPoolAttrs, PoolAttrs, pool_output_size
from tests.strategies import maybe_non_contiguous, seeded_array

#: Conv case kinds, one per kernel path (grouped convs that are not depthwise take the im2col-GEMM path).
CONV_PATHS = ("im2col_gemm", "gemm_1x1", "depthwise", "grouped")


def activation_of_kind(kind: str) -> st.SearchStrategy[Activation]:
    """An Activation of ``kind`` with drawn parameters where it has any."""
    if kind == "clip":
        return st.tuples(st.floats(-1.0, 0.5), st.floats(0.0, 3.0)).map(
            lambda t: Activation("clip", lo=t[0], hi=t[0] + t[1]))
    if kind == "leaky_relu":
        return st.floats(0.0, 0.5).map(lambda a: Activation("leaky_relu", alpha=a))
    if kind == "hard_sigmoid":
        return st.tuples(st.floats(0.05, 0.5), st.floats(0.0, 1.0)).map(
            lambda t: Activation("hard_sigmoid", alpha=t[0], beta=t[1]))
    return st.just(Activation(kind))


def activations() -> st.SearchStrategy[Activation | None]:
    """No activation or any fusable kind."""
    return st.one_of(st.none(), st.sampled_from(ACTIVATION_KINDS).flatmap(activation_of_kind))


@dataclass(frozen=True)
class ConvCase:
    """One Conv to run: attributes, input x (N, C, H, W) (maybe a non-contiguous view), weights, epilogue."""

    attrs: ConvAttrs
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    activation: Activation | None
    out_shape: tuple[int, int, int]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}


def _spatial(draw: st.DrawFn, kernel: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    """An input length (often 1) that the dilated kernel fits once padded."""
    size = draw(st.one_of(st.just(1), st.integers(1, 12)))
    extent = dilation * (kernel - 1) + 1
    return max(size, extent - pad_begin - pad_end, 1)


@st.composite
def conv_cases(draw: st.DrawFn, path: str, activation: bool = True) -> ConvCase:
    """A Conv case for kernel path ``path`` (one of CONV_PATHS): batch 1..3, channels <= 16, spatial <= 13."""
    n = draw(st.integers(1, 3))
    if path == "depthwise":
        c = k = groups = draw(st.integers(1, 16))
    elif path == "grouped":
        groups = draw(st.integers(2, 4))
        cg = draw(st.integers(1, 4))
        kg = draw(st.integers(1 if cg > 1 else 2, 4))  # cg == kg == 1 would be depthwise
        c, k = groups * cg, groups * kg
    else:
        groups = 1
        c = draw(st.integers(1, 16))
        k = draw(st.integers(2 if c == 1 else 1, 16))  # c == k == 1 would be depthwise
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if path == "gemm_1x1":
        kernel, stride, pads = (1, 1), (1, 1), (0, 0, 0, 0)
    else:
        kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        pads = tuple(draw(st.integers(0, 4)) for _ in range(4))
        if path == "im2col_gemm":
            assume(kernel != (1, 1) or stride != (1, 1) or any(pads))
    h = _spatial(draw, kernel[0], dilation[0], pads[0], pads[2])
    w = _spatial(draw, kernel[1], dilation[1], pads[1], pads[3])
    attrs = ConvAttrs(stride=stride, pads=pads, dilation=dilation, groups=groups,  # type: ignore[arg-type]
                      kernel=draw(st.sampled_from((None, kernel))))
    out_shape = (k, conv_output_size(h, kernel[0], stride[0], dilation[0], pads[0], pads[2]),
                 conv_output_size(w, kernel[1], stride[1], dilation[1], pads[1], pads[3]))
    seed = draw(st.integers(0, 2**32 - 1))
    x = maybe_non_contiguous(seeded_array(seed, (n, c, h, w)), draw(st.booleans()))
    fan_in = (c // groups) * kernel[0] * kernel[1]
    weight = seeded_array(seed + 1, (k, c // groups, *kernel), scale=1.0 / math.sqrt(fan_in))
    bias = seeded_array(seed + 2, (k,)) if draw(st.booleans()) else None
    act = draw(activations()) if activation else None
    return ConvCase(attrs, x, weight, bias, act, out_shape)


@st.composite
def channel_lists(draw: st.DrawFn, count: int, n: int) -> list[np.ndarray]:
    """Per image, a sorted int64 array of active channels among ``count``: none, one, some or all of them."""
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(("none", "one", "some", "some", "all")))
        if kind == "none":
            chosen = np.zeros(0, dtype=np.int64)
        elif kind == "one":
            chosen = np.array([draw(st.integers(0, count - 1))], dtype=np.int64)
        elif kind == "all":
            chosen = np.arange(count, dtype=np.int64)
        else:
            mask = draw(st.lists(st.booleans(), min_size=count, max_size=count))
            chosen = np.flatnonzero(mask).astype(np.int64)
        out.append(chosen)
    return out


@dataclass(frozen=True)
class PoolCase:
    """One windowed pool: op type, attributes, input x (N, C, H, W) and the output feature shape."""

    op: str
    attrs: PoolAttrs
    x: np.ndarray
    out_shape: tuple[int, int, int]


@st.composite
def pool_cases(draw: st.DrawFn, op: str, torch_compatible: bool = False) -> PoolCase:
    """A MaxPool/AveragePool case. torch_compatible: symmetric pads <= kernel/2, as torch requires."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    if torch_compatible:
        ph, pw = draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))
        pads = (ph, pw, ph, pw)
    else:
        pads = tuple(draw(st.integers(0, 5)) for _ in range(4))
    ceil_mode = draw(st.booleans())
    h = max(draw(st.one_of(st.just(1), st.integers(1, 12))), kernel[0] - pads[0] - pads[2], 1)
    w = max(draw(st.one_of(st.just(1), st.integers(1, 12))), kernel[1] - pads[1] - pads[3], 1)
    if op == "MaxPool":
        attrs: PoolAttrs = MaxPoolAttrs(kernel=kernel, stride=stride, pads=pads, ceil_mode=ceil_mode)  # type: ignore[arg-type]
    else:
        attrs = AveragePoolAttrs(kernel=kernel, stride=stride, pads=pads, ceil_mode=ceil_mode,  # type: ignore[arg-type]
                                 count_include_pad=draw(st.booleans()))
    sh, sw = attrs.strides
    out_shape = (c, pool_output_size(h, kernel[0], sh, pads[0], pads[2], ceil_mode),
                 pool_output_size(w, kernel[1], sw, pads[1], pads[3], ceil_mode))
    seed = draw(st.integers(0, 2**32 - 1))
    x = maybe_non_contiguous(seeded_array(seed, (n, c, h, w)), draw(st.booleans()))
    return PoolCase(op, attrs, x, out_shape)


@st.composite
def depthwise_cases(draw: st.DrawFn, min_pixels: int = 1, max_pixels: int = 10_000,
                    taps3x3: bool = False, pad_one: bool = False) -> ConvCase:
    """A depthwise Conv whose output plane has between min_pixels and max_pixels positions (the numba
    backend picks its depthwise kernel by output size): spatial up to 24, strides 1..3, dilation 1..2.
    taps3x3: only 3x3 kernels, dilation 1, the same stride 1 or 2 both ways (the numba 3x3 kernel's cases).
    pad_one (with taps3x3): padding 1 above and to the left, at stride 1 also below and to the right, at
    stride 2 0 or 1 there on an even width (the numba flat 3x3 kernel's cases: MobileNetV2's convs)."""
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 12))
    if taps3x3:
        kernel, dilation = (3, 3), (1, 1)
        stride = (draw(st.integers(1, 2)),) * 2
    else:
        kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if pad_one:
        ends = (1, 1) if stride[0] == 1 else (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
        pads = (1, 1, *ends)
        h = max(draw(st.integers(1, 24)), 2 - ends[0])  # the padded input fits the kernel
        w = draw(st.integers(1, 24)) if stride[1] == 1 else 2 * draw(st.integers(1, 12))
    else:
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        h = max(draw(st.integers(1, 24)), dilation[0] * (kernel[0] - 1) + 1 - pads[0] - pads[2], 1)
        w = max(draw(st.integers(1, 24)), dilation[1] * (kernel[1] - 1) + 1 - pads[1] - pads[3], 1)
    out_shape = (c, conv_output_size(h, kernel[0], stride[0], dilation[0], pads[0], pads[2]),
                 conv_output_size(w, kernel[1], stride[1], dilation[1], pads[1], pads[3]))
    assume(min_pixels <= out_shape[1] * out_shape[2] <= max_pixels)
    seed = draw(st.integers(0, 2**32 - 1))
    x = maybe_non_contiguous(seeded_array(seed, (n, c, h, w)), draw(st.booleans()))
    weight = seeded_array(seed + 1, (c, 1, *kernel), scale=1.0 / math.sqrt(kernel[0] * kernel[1]))
    bias = seeded_array(seed + 2, (c,)) if draw(st.booleans()) else None
    attrs = ConvAttrs(stride=stride, pads=pads, dilation=dilation, groups=c)  # type: ignore[arg-type]
    return ConvCase(attrs, x, weight, bias, draw(activations()), out_shape)


@contextlib.contextmanager
def constants_set(module: ModuleType, **values: int) -> Iterator[None]:
    """Within the block, the module's named constants have these values (the choices kernels make from them at
    build time: a fixture cannot be used inside hypothesis tests); restored after."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def thread_context(threads: int) -> KernelContext:
    """A kernel context for a run of ``threads`` compute threads."""
    context = KernelContext()
    context.threads = threads
    return context


def winograd_tile(m: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, every Winograd conv built takes output tiles of m x m: 4 forces F(4x4, 3x3) at any size
    (the small test shapes would take F(2x2)), 2 rules it out. The tile size is fixed when a kernel is built."""
    if m == 4:
        return constants_set(winograd, MIN_TILES_F4=1, MIN_WORK_F4=0)
    return constants_set(winograd, MIN_TILES_F4=1 << 30, MIN_WORK_F4=1 << 62)


@st.composite
def winograd_cases(draw: st.DrawFn) -> ConvCase:
    """A 3x3 stride-1 Conv large enough for the Winograd path: 16..24 channels each way, outputs 11..16 per side
    (at least winograd.MIN_TILES tiles; odd sizes crop the last tile), any pads 0..2."""
    n = draw(st.integers(1, 2))
    c, k = draw(st.integers(16, 24)), draw(st.integers(16, 24))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(13, 18)) - pads[0] - pads[2]
    w = draw(st.integers(13, 18)) - pads[1] - pads[3]
    out_shape = (k, h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2)
    seed = draw(st.integers(0, 2**32 - 1))
    x = maybe_non_contiguous(seeded_array(seed, (n, c, h, w)), draw(st.booleans()))
    weight = seeded_array(seed + 1, (k, c, 3, 3), scale=1.0 / math.sqrt(9 * c))
    bias = seeded_array(seed + 2, (k,)) if draw(st.booleans()) else None
    attrs = ConvAttrs(pads=pads, kernel=draw(st.sampled_from((None, (3, 3)))))  # type: ignore[arg-type]
    return ConvCase(attrs, x, weight, bias, draw(activations()), out_shape)

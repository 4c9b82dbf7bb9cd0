"""What a backend kernel receives and how it is called. Arithmetic only: no thresholds, no gates.

A backend maps op types to *factories*: ``factory(spec: KernelSpec) -> Kernel``. The factory runs once at
load time (it may pack weights into the layout it likes); the kernel runs every call::

    kernel(inputs, outputs)                                   # every op
    kernel(inputs, outputs, active_out=..., active_in=...)    # ops with supports_gating (Conv)

- ``inputs``: float32 arrays with the batch dimension, shapes ``(N, *spec.in_shapes[i])``; they may be
  non-contiguous views and must not be modified.
- ``outputs``: preallocated C-contiguous float32 arrays ``(N, *spec.out_shapes[i])`` that the kernel
  overwrites completely (their previous content is garbage from an earlier run).
- ``active_out``: None (all channels) or one sorted int64 array per image of the output channels that
  must be computed; the others must be written as 0.
- ``active_in``: None or one sorted int64 array per image of the input channels that may be non-zero;
  the others are known to be all zero and may be skipped.

Scratch memory and threads: ``spec.context`` (a :class:`KernelContext`, one per plan, shared by its kernels)
holds per-thread scratch memory (im2col columns, gathered weights) that is allocated once and reused by
every later call of that thread, and the thread budget of the thread's current run. A kernel built without
one (tests) makes its own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Shape = tuple[int, ...]

#: Fusable element-wise activations (the epilogue of Conv and Gemm) and their parameters.
ACTIVATION_KINDS = (
    "relu", "clip", "leaky_relu", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "silu",
)


@dataclass(frozen=True)
class Activation:
    """An element-wise activation fused into a kernel's epilogue.

    kind: one of ACTIVATION_KINDS. Parameters: ``clip`` uses lo/hi (ReLU6 is clip 0..6); ``leaky_relu``
    uses alpha (slope for x < 0); ``hard_sigmoid`` uses alpha/beta (max(0, min(1, alpha*x + beta))).
    """

    kind: str
    alpha: float = 0.0
    beta: float = 0.0
    lo: float = 0.0
    hi: float = 0.0


@functools.lru_cache(maxsize=256)
def all_indices(n: int) -> np.ndarray:
    """int64 0..n-1: the "every channel" list, and a compact tensor's plane positions, passed to kernels on
    every call (cached and shared, so never modified by anyone; not flagged read-only, which would make Numba
    compile a second specialisation)."""
    return np.arange(n, dtype=np.int64)


def apply_activation(y: np.ndarray, act: Activation | None) -> None:
    """Apply ``act`` to float32 array ``y`` in place (any shape). The NumPy definition every backend meets."""
    if act is None:
        return
    k = act.kind
    if k == "relu":
        np.maximum(y, 0.0, out=y)
    elif k == "clip":
        np.clip(y, act.lo, act.hi, out=y)
    elif k == "leaky_relu":
        np.multiply(y, np.where(y < 0, np.float32(act.alpha), np.float32(1.0)), out=y)
    elif k == "sigmoid":
        # exp of -|y| never overflows; the two branches are the same function.
        e = np.exp(-np.abs(y))
        np.copyto(y, np.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32))
    elif k == "tanh":
        np.tanh(y, out=y)
    elif k == "hard_sigmoid":
        np.multiply(y, np.float32(act.alpha), out=y)
        np.add(y, np.float32(act.beta), out=y)
        np.clip(y, 0.0, 1.0, out=y)
    elif k == "hard_swish":
        np.multiply(y, np.clip(y + np.float32(3.0), 0.0, 6.0) / np.float32(6.0), out=y)
    elif k == "silu":
        s = np.empty_like(y)
        np.copyto(s, y)
        apply_activation(s, Activation("sigmoid"))
        np.multiply(y, s, out=y)
    else:
        raise ValueError(f"unknown activation {k!r}")


def keeps_zero(act: Activation | None) -> bool:
    """True when act(0) == 0, so channels known to be zero stay zero through it."""
    if act is None:
        return True
    if act.kind in ("sigmoid", "hard_sigmoid"):
        return False
    if act.kind == "clip":
        return act.lo <= 0.0 <= act.hi
    return True


#: Scratch pieces start on 64-byte boundaries (one cache line, one AVX-512 register).
_ALIGN_FLOATS = 16
#: Most size tuples whose scratch views a KernelContext remembers.
_SCRATCH_VIEWS_KEPT = 64


class KernelContext(threading.local):
    """Per-thread state shared by the kernels of one plan: scratch memory and the thread budget.

    Being a ``threading.local``, each thread sees its own attributes, so kernels called concurrently from
    several threads never share scratch memory. ``threads``: compute threads of this thread's current run
    (None: the library defaults); the runtime sets it before a run, kernels read it to choose serial or
    parallel variants.
    """

    def __init__(self) -> None:
        self.threads: int | None = None
        self._scratch = np.empty(0, dtype=np.float32)
        self._aligned_start = 0
        # sizes -> the views scratch(*sizes) returned, for the current buffer (a conv asks for the same sizes
        # on every dense call; cutting the views is most of this method's time).
        self._views: dict[tuple[int, ...], list[np.ndarray]] = {}

    def scratch(self, *sizes: int) -> list[np.ndarray]:
        """Flat float32 arrays of ``sizes`` elements, carved from this thread's scratch buffer (grown, never
        shrunk: after a thread's first call no more memory is allocated). Valid until the next call of
        ``scratch`` in this thread, i.e. within one kernel call; contents are garbage. The returned list may
        be the one an earlier call with the same sizes returned: callers unpack it, never modify it."""
        views = self._views.get(sizes)
        if views is not None:
            return views
        spans = [-(-max(int(s), 1) // _ALIGN_FLOATS) * _ALIGN_FLOATS for s in sizes]
        total = sum(spans) + _ALIGN_FLOATS
        buf = self._scratch
        if buf.size < total:
            self._views.clear()
            buf = self._scratch = np.empty(total, dtype=np.float32)
            # Start on an aligned element: NumPy aligns large buffers to 16 bytes only.
            self._aligned_start = (-(buf.ctypes.data // 4)) % _ALIGN_FLOATS
        start = self._aligned_start
        out = []
        for size, span in zip(sizes, spans):
            out.append(buf[start:start + int(size)])
            start += span
        if len(self._views) >= _SCRATCH_VIEWS_KEPT:  # gated convs ask for many sizes: keep the table small
            self._views.clear()
        self._views[sizes] = out
        return out


@dataclass(frozen=True)
class KernelSpec:
    """Everything a factory needs, fixed at load time.

    op: op type (``"Conv"``); attrs: the op's attribute dataclass; weights: float32 arrays by name (for a
    Conv, BatchNorm has already been folded into ``weight``/``bias``); in_shapes/out_shapes: feature
    shapes (without N); activation: a fused epilogue (Conv and Gemm only), applied after the bias;
    context: the plan's shared :class:`KernelContext` (None: the kernel makes its own).
    """

    op: str
    attrs: Any
    weights: Mapping[str, np.ndarray]
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    activation: Activation | None = None
    name: str = field(default="", compare=False)
    context: KernelContext | None = field(default=None, compare=False, repr=False)

    def kernel_context(self) -> KernelContext:
        """The plan's context, or a new one for a kernel built on its own."""
        return self.context if self.context is not None else KernelContext()


class Kernel(Protocol):
    def __call__(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None: ...

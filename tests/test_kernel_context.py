"""KernelContext: per-thread scratch memory carved into aligned pieces, grown once, never shared by threads."""

from __future__ import annotations

import threading

import numpy as np

from parsicore.kernels.base import KernelContext


def test_scratch_pieces_are_aligned_disjoint_and_sized() -> None:
    ctx = KernelContext()
    a, b, c = ctx.scratch(5, 0, 33)
    assert (a.size, b.size, c.size) == (5, 0, 33)
    for piece in (a, c):
        assert piece.dtype == np.float32 and piece.flags.c_contiguous
        assert piece.ctypes.data % 64 == 0
    a[:] = 1.0
    c[:] = 2.0
    assert (a == 1.0).all() and (c == 2.0).all()


def test_scratch_grows_once_then_is_reused() -> None:
    ctx = KernelContext()
    ctx.scratch(1000)
    first = ctx._scratch
    ctx.scratch(10, 20)
    assert ctx._scratch is first
    ctx.scratch(5000)
    grown = ctx._scratch
    assert grown is not first and grown.size >= 5000
    ctx.scratch(1000)
    assert ctx._scratch is grown


def test_each_thread_has_its_own_scratch_and_threads() -> None:
    ctx = KernelContext()
    ctx.threads = 3
    mine = ctx.scratch(100)[0]
    seen = {}

    def worker() -> None:
        seen["threads"] = ctx.threads
        seen["buffer"] = ctx.scratch(100)[0]

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["threads"] is None
    assert not np.shares_memory(seen["buffer"], mine)

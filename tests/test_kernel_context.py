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


def test_scratch_views_of_repeated_sizes_stay_valid_across_growth() -> None:
    """Sizes asked for again give usable views of the current buffer, also after it grew in between."""
    ctx = KernelContext()
    a, b = ctx.scratch(100, 50)
    again = ctx.scratch(100, 50)
    assert [v.size for v in again] == [100, 50]
    assert not np.shares_memory(again[0], again[1])
    ctx.scratch(10_000)  # grows: views cut before now belong to the old buffer
    c, d = ctx.scratch(100, 50)
    for view in (c, d):
        assert np.shares_memory(view, ctx._scratch) and view.ctypes.data % 64 == 0
    assert not np.shares_memory(c, d)
    for i in range(200):  # many different sizes (gated convs): every answer still sized and in the buffer
        (piece,) = ctx.scratch(i + 1)
        assert piece.size == i + 1 and np.shares_memory(piece, ctx._scratch)

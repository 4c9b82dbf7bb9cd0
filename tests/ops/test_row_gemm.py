"""The numba backend's row GEMM (parsicore.kernels.numba_backend.row_gemm: the active weight rows read in place)
against a float64 reference: the kernel alone (any shape, stacked slices, destination rows, bias, activation,
threads, K blocks), and Conv's row-gated paths (im2col, 1x1, Winograd) with it forced on at every shape."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsicore.kernels import factories
from parsicore.kernels.base import Activation, KernelSpec, apply_activation
from parsicore.kernels.numpy_backend import winograd
from parsicore.ops.conv import ConvAttrs
from tests.ops._strategies_conv import (
    ConvCase,
    activations,
    channel_lists,
    constants_set,
    conv_cases,
    thread_context,
    winograd_cases,
    winograd_tile,
)
from tests.ops.test_conv import _expand, assert_close, expected, zero_inactive
from tests.strategies import seeded_array

row_gemm = pytest.importorskip("parsicore.kernels.numba_backend.row_gemm")
if not row_gemm.ENABLED:
    pytest.skip("no row GEMM on this machine (needs the 16-lane packed GEMM tile)", allow_module_level=True)


def rows_everywhere() -> contextlib.AbstractContextManager[None]:
    """Within the block, every row-gated GEMM at N <= COLUMNS takes the row GEMM (the test shapes are shallower
    than its MIN_DEPTH)."""
    return constants_set(row_gemm, MIN_DEPTH=0)


@given(x=st.sampled_from([None, 1, 3]), m=st.integers(1, 30), k=st.integers(1, 300), n=st.integers(1, 150),
       has_bias=st.booleans(), act=activations(), threads=st.sampled_from([1, 2, 3]), block=st.sampled_from([5, 128]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_row_gemm_matches_reference(x: int | None, m: int, k: int, n: int, has_bias: bool, act: Activation | None,
                                    threads: int, block: int, seed: int, data: st.DataObject) -> None:
    """out[..., dest[i]] = act(w[..., rows[i]] @ b + bias[dest[i]]) at every edge: tiles of fewer than ROWS rows,
    columns past a tile (masked lanes) and past COLUMNS, K blocks of 5 steps, a stack of slices, scattered or
    compact destination rows (other rows untouched), 2 or 3 threads splitting the row tiles or, for one GEMM
    wider than tall, the column blocks."""
    lead = () if x is None else (x,)
    w = seeded_array(seed, (*lead, m, k))
    b = seeded_array(seed + 1, (*lead, k, n))
    rows = np.sort(np.random.default_rng(seed).choice(m, data.draw(st.integers(1, m)), replace=False)).astype(np.int64)
    compact = data.draw(st.booleans())
    total = rows.size if compact else m
    dest = np.arange(rows.size, dtype=np.int64) if compact else None
    bias = seeded_array(seed + 2, (total,)) if has_bias else None
    out = np.full((*lead, total, n), np.nan, dtype=np.float32)
    with constants_set(row_gemm, DEPTH=block):
        row_gemm.row_gemm(w, rows, b, out, bias, act, thread_context(threads), dest=dest, parallel=threads > 1)
    written = rows if dest is None else dest
    exact = np.matmul(w[..., rows, :].astype(np.float64), b.astype(np.float64))
    want = (exact + (0.0 if bias is None else bias[written, None])).astype(np.float32)
    apply_activation(want, act)
    scale = float(max(1.0, np.abs(exact).max()))
    np.testing.assert_allclose(out[..., written, :], want, rtol=1e-4, atol=1e-4 * scale)
    untouched = np.setdiff1d(np.arange(total), written)
    assert np.isnan(out[..., untouched, :]).all(), "rows outside ``dest`` must stay unwritten"


def test_row_gemm_rejects_mismatched_operands() -> None:
    w = np.ones((20, 8), dtype=np.float32)
    out = np.empty((20, 5), dtype=np.float32)
    rows = np.arange(4, dtype=np.int64)
    with pytest.raises(ValueError, match="b must be"):
        row_gemm.row_gemm(w, rows, np.ones((7, 5), dtype=np.float32), out)
    with pytest.raises(ValueError, match="rows must be"):
        row_gemm.row_gemm(w, rows + 17, np.ones((8, 5), dtype=np.float32), out)
    with pytest.raises(ValueError, match="rows must be"):
        row_gemm.row_gemm(w, rows - 1, np.ones((8, 5), dtype=np.float32), out)
    with pytest.raises(ValueError, match="dest must be"):
        row_gemm.row_gemm(w, rows, np.ones((8, 5), dtype=np.float32), out, dest=rows[:2])
    with pytest.raises(ValueError, match="dest must be"):
        row_gemm.row_gemm(w, rows, np.ones((8, 5), dtype=np.float32), out, dest=rows + 17)
    with pytest.raises(ValueError, match="dest must be"):  # dest None: the rows themselves, past out's 3 rows
        row_gemm.row_gemm(w, rows, np.ones((8, 5), dtype=np.float32), np.empty((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="out must be"):
        row_gemm.row_gemm(w, rows, np.ones((8, 5), dtype=np.float32), np.empty((20, 6), dtype=np.float32))


_GUARDED = r"""
import ctypes, mmap, sys
import numpy as np
from parsicore.kernels.base import Activation
from parsicore.kernels.numba_backend import row_gemm
page = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded_tail(count):
    # The last ``count`` floats of a page followed by one the process may neither read nor write (PROT_NONE).
    buf = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mprotect(start + page, page, 0) != 0:
        sys.exit(3)
    first = np.frombuffer(buf, dtype=np.float32, count=page // 4)
    return first[first.size - count:]


k, n, act = 7, int(sys.argv[1]), sys.argv[2]
b = guarded_tail(k * n).reshape(k, n)  # B's last row ends where a guard page starts
b[:] = np.arange(k * n, dtype=np.float32).reshape(k, n) / (k * n)
w = np.ones((8, k), dtype=np.float32)
rows = np.arange(8, dtype=np.int64)
out = guarded_tail(8 * n).reshape(8, n)  # so does out's last row
activation = None if act == "none" else Activation(act)
row_gemm.row_gemm(w, rows, b, out, None, activation)
want = np.repeat(b.sum(axis=0)[None, :], 8, axis=0)
if act == "sigmoid":
    want = 1.0 / (1.0 + np.exp(-want))
assert np.allclose(out, want, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard page: Linux only")
@pytest.mark.parametrize("act", ["none", "relu", "sigmoid"])
@pytest.mark.parametrize("n", [1, 17, 49, 64, 70])
def test_row_gemm_touches_nothing_past_b_or_out(n: int, act: str) -> None:
    """B and out placed so that their last rows end at a page the process may not touch: the masked loads past N,
    and the stores past N of the tiles that finish to out (no activation, ReLU) or of the epilogue (sigmoid),
    must not reach it (an unmasked access there kills the child process with SIGSEGV)."""
    done = subprocess.run([sys.executable, "-c", _GUARDED, str(n), act], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_pays_only_deep_and_narrow() -> None:
    assert row_gemm.pays(4608, 49) and row_gemm.pays(row_gemm.MIN_DEPTH, row_gemm.COLUMNS)
    assert not row_gemm.pays(32, 49)  # the default model's conv2 (16 slices of 64x32 by 49): gather + BLAS
    assert not row_gemm.pays(4608, 196)


def _spied(kernel) -> list[int]:  # type: ignore[no-untyped-def]
    """The kernel with its row GEMM wrapped: the returned list gets one entry (the rows' count) per call."""
    calls: list[int] = []
    own = kernel.micro.row_gemm

    def spy(w: np.ndarray, rows: np.ndarray, *args: object, **kwargs: object) -> None:
        calls.append(rows.size)
        own(w, rows, *args, **kwargs)

    kernel.micro = dataclasses.replace(kernel.micro, row_gemm=spy)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@given(data=st.data())
def test_conv_row_gated_paths_match_reference(threads: int, data: st.DataObject) -> None:
    """im2col and 1x1 convs gated by output rows only (full or channel-compact output), with the row GEMM forced
    on: the active rows of the plain weights read in place, the inactive output planes 0."""
    kind = data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1"]))
    case = data.draw(conv_cases(kind))
    if kind == "im2col_gemm" and case.attrs.groups != 1:
        return
    n, k = case.x.shape[0], case.out_shape[0]
    compact_out = data.draw(st.booleans())
    active_out = data.draw(channel_lists(k, n))
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(threads))
    with rows_everywhere():
        kernel = factories("numba")["Conv"](spec)
        calls = _spied(kernel)
        y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
        kernel([case.x], [y], active_out=active_out, compact_out=compact_out)
    narrow = case.out_shape[1] * case.out_shape[2] <= row_gemm.COLUMNS
    assert calls == [rows.size for rows in active_out if narrow and 0 < rows.size < k]
    if compact_out:
        for i, rows in enumerate(active_out):
            assert np.isnan(y[i, rows.size:]).all(), "planes past the active channels must stay unwritten"
        y = _expand(y, active_out)
    want, scale = expected(case, active_out=active_out)
    assert_close(y, want, scale)


@pytest.mark.parametrize("threads", [1, 2])
@given(data=st.data())
def test_conv_wide_row_gemm_dense_and_row_gated_match_reference(threads: int, data: st.DataObject) -> None:
    """im2col and 1x1 convs taking the row GEMM as wide and shallow (forced at any size): dense calls on every row,
    finished by the tiles themselves (no activation, ReLU, clip) or by the epilogue (the others), calls gated by
    output rows, and calls gated by input channels (with or without rows: the weight columns gathered), against the
    reference, with the calls counted."""
    kind = data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1"]))
    case = data.draw(conv_cases(kind))
    if case.attrs.groups != 1:
        return
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(threads))
    with constants_set(row_gemm, WIDE_MIN_COLUMNS=0, WIDE_MAX_DEPTH=1 << 30):
        _wide_calls(case, spec, data)


def _wide_calls(case, spec, data) -> None:  # type: ignore[no-untyped-def]
    """The body of the test above, with the wide rule forced (gated calls apply it at call time)."""
    n, k = case.x.shape[0], case.out_shape[0]
    kernel = factories("numba")["Conv"](spec)
    calls = _spied(kernel)
    wide = kernel._wide  # not where the packed GEMM or the blocked im2col runs
    y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y])
    assert calls == ([k] * n if wide else [])
    want, scale = expected(case)
    assert_close(y, want, scale)
    active_out = data.draw(channel_lists(k, n))
    calls.clear()
    y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y], active_out=active_out)
    assert calls == [rows.size for rows in active_out if wide and rows.size > 0]  # all rows on: dense, same GEMM
    want, scale = expected(case, active_out=active_out)
    assert_close(y, want, scale)
    # Gated by input channels, with or without output rows: the active weight columns gathered, then the row GEMM
    c = case.in_shape[0]
    active_in = data.draw(channel_lists(c, n))
    rows_too = data.draw(st.booleans())
    compact_out = rows_too and data.draw(st.booleans())  # the active rows into the output's first planes
    calls.clear()
    x = zero_inactive(case.x, active_in, fill=np.nan)
    y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
    kernel([x], [y], active_in=active_in, active_out=active_out if rows_too else None, compact_out=compact_out)
    if wide and any(0 < chans.size < c and (not rows_too or rows.size > 0)
                    for chans, rows in zip(active_in, active_out)):
        assert calls, "an input-gated wide call should take the row GEMM"
    if compact_out:
        y = _expand(y, active_out)
    want, scale = expected(case, active_out=active_out if rows_too else None, active_in=active_in)
    assert_close(y, want, scale)


@pytest.mark.parametrize("compact_out", [False, True])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_wide_row_gemm_gated_by_channels_and_rows(compact_out: bool, kernel_size: int) -> None:
    """An input-gated call that also gates scattered output rows, through the wide row GEMM (forced): the gathered
    weight rows and columns, the bias of each active row (compact output: the active rows' biases in order), the
    other planes 0, against the reference."""
    c, k, side = 8, 6, 9
    attrs = ConvAttrs(pads=(kernel_size // 2,) * 4)
    case = ConvCase(attrs, seeded_array(40, (1, c, side, side)), seeded_array(41, (k, c, kernel_size, kernel_size)),
                    seeded_array(42, (k,)), Activation("relu"), (k, side, side))
    active_in, active_out = [np.array([1, 3, 4], np.int64)], [np.array([0, 2, 5], np.int64)]
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(1))
    with constants_set(row_gemm, WIDE_MIN_COLUMNS=0, WIDE_MAX_DEPTH=1 << 30):
        kernel = factories("numba")["Conv"](spec)
        calls = _spied(kernel)
        y = np.full((1, *case.out_shape), np.nan, dtype=np.float32)
        kernel([zero_inactive(case.x, active_in, fill=np.nan)], [y], active_in=active_in, active_out=active_out,
               compact_out=compact_out)
    assert calls == [3]
    if compact_out:
        assert np.isnan(y[0, 3:]).all(), "planes past the active channels must stay unwritten"
        y = _expand(y, active_out)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)


def test_wide_takes_only_wide_and_shallow_gemms() -> None:
    assert row_gemm.wide(16, 12544) and row_gemm.wide(row_gemm.WIDE_MAX_DEPTH, row_gemm.WIDE_MIN_COLUMNS)
    assert not row_gemm.wide(row_gemm.WIDE_MAX_DEPTH + 1, 12544)  # deep: BLAS
    assert not row_gemm.wide(64, row_gemm.WIDE_MIN_COLUMNS - 1)  # MobileNetV2's 14x14 stage: BLAS


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("threads", [1, 2])
@given(data=st.data())
def test_conv_winograd_row_gated_matches_reference(threads: int, tile: int, data: st.DataObject) -> None:
    """A Winograd conv gated by output rows only, with the row GEMM forced on: the 16 or 36 slice GEMMs read the
    active rows of the transformed weights in place."""
    case = data.draw(winograd_cases())
    n, k = case.x.shape[0], case.out_shape[0]
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=thread_context(threads))
    with winograd_tile(tile), constants_set(winograd, GATED_MIN_COLUMNS=0):  # F(4x4)'s few tiles stay Winograd
        kernel = factories("numba")["Conv"](spec)
    assert kernel.path == "winograd_3x3" and kernel.winograd_gated
    active_out = data.draw(channel_lists(k, n))
    y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
    with rows_everywhere():
        calls = _spied(kernel)
        kernel([case.x], [y], active_out=active_out)
    want, scale = expected(case, active_out=active_out)
    assert_close(y, want, scale)
    count = winograd.tile_columns(kernel.tiles_h, kernel.tiles_w)
    assert calls == [rows.size for rows in active_out if 0 < rows.size < k and count <= row_gemm.COLUMNS
                     and winograd.gated_pays(rows.size, case.in_shape[0])]

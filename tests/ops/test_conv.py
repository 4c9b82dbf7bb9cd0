"""Conv: attributes, shape/MAC rules, the naive reference against torch, and every kernel path of every fast
backend against the reference (im2col-GEMM, 1x1 GEMM, depthwise, grouped, gated rows/columns)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from parsicore.kernels import factories
from parsicore.kernels.base import ACTIVATION_KINDS, Activation, KernelSpec, apply_activation
from parsicore.kernels.numpy_backend.conv import ConvGeometry, conv_path
from parsicore.ops.base import parse_attrs
from parsicore.ops.conv import ConvAttrs, ConvOp
from tests.concurrency import run_in_threads
from tests.ops._strategies_conv import (
    ConvCase,
    activation_of_kind,
    channel_lists,
    constants_set,
    conv_cases,
    depthwise_cases,
    winograd_cases,
    winograd_tile,
)
from tests.strategies import backends, seeded_array

CONV = ConvOp()
BACKENDS = backends()


# --- helpers ------------------------------------------------------------------------------------------


def _spec(case: ConvCase) -> KernelSpec:
    return KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, name="conv")


def run_kernel(backend: str, case: ConvCase, x: np.ndarray | None = None, **gating: object) -> np.ndarray:
    """The backend's output for case (or for input x), starting from a NaN-filled output buffer."""
    x = case.x if x is None else x
    kernel = factories(backend)["Conv"](_spec(case))
    y = np.full((x.shape[0], *case.out_shape), np.nan, dtype=np.float32)
    kernel([x], [y], **gating)
    return y


def expected(case: ConvCase, active_out: list[np.ndarray] | None = None,
             active_in: list[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Dense reference with inactive input channels zeroed and inactive output channels zeroed after the
    epilogue; and the magnitude the tolerance scales with."""
    x = np.array(case.x, dtype=np.float32)
    if active_in is not None:
        for n, chans in enumerate(active_in):
            x[n, np.setdiff1d(np.arange(x.shape[1]), chans)] = 0.0
    (pre,) = CONV.reference(case.attrs, [x], case.weights)
    y = pre.copy()
    apply_activation(y, case.activation)
    if active_out is not None:
        for n, rows in enumerate(active_out):
            y[n, np.setdiff1d(np.arange(y.shape[1]), rows)] = 0.0
    return y, float(max(1.0, np.abs(pre).max(initial=0.0)))


def zero_inactive(x: np.ndarray, active_in: list[np.ndarray], fill: float = 0.0) -> np.ndarray:
    """A contiguous copy of x with every input channel not in active_in set to ``fill``."""
    out = np.array(x, dtype=np.float32)
    for n, chans in enumerate(active_in):
        out[n, np.setdiff1d(np.arange(x.shape[1]), chans)] = fill
    return out


def assert_close(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def path_of(case: ConvCase) -> str:
    return conv_path(ConvGeometry.from_spec(_spec(case)))


# --- attributes, shapes, MACs ---------------------------------------------------------------------------


def test_attrs_parse_and_check() -> None:
    attrs = parse_attrs(ConvAttrs, {"stride": [2, 1], "pads": [1, 0, 2, 0], "groups": 2, "kernel": [3, 3]})
    assert attrs == ConvAttrs(stride=(2, 1), pads=(1, 0, 2, 0), groups=2, kernel=(3, 3))
    for bad in ({"stride": [0, 1]}, {"dilation": [1, 0]}, {"pads": [0, -1, 0, 0]}, {"groups": 0},
                {"kernel": [0, 3]}, {"pads": [1, 1]}, {"stride": 2}, {"padding": [1, 1, 1, 1]}):
        with pytest.raises(ValueError):
            parse_attrs(ConvAttrs, bad)


def test_infer_output_shape_and_macs() -> None:
    attrs = ConvAttrs(stride=(2, 3), pads=(1, 2, 0, 1), dilation=(2, 1))
    weights = {"weight": (8, 3, 3, 2), "bias": (8,)}
    # Ho = (10 + 1 + 0 - 2*2 - 1)//2 + 1 = 4; Wo = (7 + 2 + 1 - 1 - 1)//3 + 1 = 3.
    assert CONV.infer(attrs, [(3, 10, 7)], weights) == [(8, 4, 3)]
    assert CONV.macs(attrs, [(3, 10, 7)], [(8, 4, 3)], weights) == 8 * 4 * 3 * 3 * 3 * 2
    grouped = ConvAttrs(groups=4, pads=(1, 1, 1, 1))
    assert CONV.infer(grouped, [(8, 5, 5)], {"weight": (12, 2, 3, 3)}) == [(12, 5, 5)]
    assert CONV.macs(grouped, [(8, 5, 5)], [(12, 5, 5)], {"weight": (12, 2, 3, 3)}) == 12 * 25 * 2 * 9
    assert ConvOp.supports_gating is True


@pytest.mark.parametrize(("attrs", "in_shape", "weights"), [
    (ConvAttrs(), (3, 5, 5), {"weight": (4, 2, 3, 3)}),                  # weight channels != C
    (ConvAttrs(groups=2), (3, 5, 5), {"weight": (4, 1, 3, 3)}),          # C not divisible by groups
    (ConvAttrs(groups=2), (4, 5, 5), {"weight": (3, 2, 3, 3)}),          # K not divisible by groups
    (ConvAttrs(), (3, 5, 5), {"weight": (4, 3, 3)}),                     # weight rank
    (ConvAttrs(), (3, 5, 5), {"weight": (4, 3, 3, 3), "bias": (3,)}),    # bias length
    (ConvAttrs(kernel=(3, 3)), (3, 5, 5), {"weight": (4, 3, 1, 1)}),     # kernel attr != weight
    (ConvAttrs(), (3, 2, 5), {"weight": (4, 3, 3, 3)}),                  # output height 0
    (ConvAttrs(dilation=(1, 3)), (3, 5, 5), {"weight": (4, 3, 3, 3)}),   # dilated extent 7 > 5
    (ConvAttrs(), (3, 5), {"weight": (4, 3, 3, 3)}),                     # input rank
])
def test_infer_rejects_inconsistent_shapes(attrs: ConvAttrs, in_shape: tuple[int, ...],
                                           weights: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        CONV.infer(attrs, [in_shape], weights)


@pytest.mark.parametrize("path", ["im2col_gemm", "depthwise", "grouped"])
@given(data=st.data())
def test_reference_matches_torch(path: str, data: st.DataObject) -> None:
    torch = pytest.importorskip("torch")
    case = data.draw(conv_cases(path, activation=False))
    a = case.attrs
    top, left, bottom, right = a.pads
    x = torch.nn.functional.pad(torch.from_numpy(np.array(case.x)), (left, right, top, bottom))
    bias = None if case.bias is None else torch.from_numpy(case.bias)
    want = torch.nn.functional.conv2d(x, torch.from_numpy(case.weight), bias, stride=a.stride,
                                      dilation=a.dilation, groups=a.groups).numpy()
    (got,) = CONV.reference(a, [case.x], case.weights)
    assert got.shape == want.shape
    assert_close(got, want, float(max(1.0, np.abs(want).max())))


# --- dense kernel paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases("im2col_gemm"))
def test_conv_im2col_gemm_matches_reference(backend: str, case: ConvCase) -> None:
    assume(path_of(case) == "im2col_gemm")  # large enough 3x3 stride-1 cases take winograd_3x3
    want, scale = expected(case)
    assert_close(run_kernel(backend, case), want, scale)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases("im2col_gemm"), block=st.integers(1, 400))
def test_conv_im2col_row_blocks_match_reference(backend: str, threads: int, case: ConvCase, block: int) -> None:
    """The blocked im2col conv (large column matrices: im2col, GEMM and epilogue per block of output rows, the
    blocks spread over threads), forced on small cases with blocks of a few rows (some all padding)."""
    assume(path_of(case) == "im2col_gemm" and case.attrs.groups == 1)
    from parsicore.kernels.base import KernelContext
    from parsicore.kernels.numpy_backend import conv as numpy_conv

    context = KernelContext()
    context.threads = threads
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,),
                      activation=case.activation, context=context)
    with constants_set(numpy_conv, BLOCKED_IM2COL_MIN=0, BLOCK_COLUMNS=block):
        kernel = factories(backend)["Conv"](spec)
    assert kernel.row_blocks is not None
    y = np.full((case.x.shape[0], *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y])
    want, scale = expected(case)
    assert_close(y, want, scale)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("act", [None, "relu", "clip"])
@given(size=st.integers(34, 60), stride=st.integers(1, 2), pad=st.integers(0, 3), block=st.integers(100, 3000),
       seed=st.integers(0, 2**16))
def test_conv_row_blocks_on_the_numba_pool_match_reference(threads: int, act: str | None, size: int, stride: int,
                                                           pad: int, block: int, seed: int) -> None:
    """The numba backend runs a blocked conv's blocks on its own pool (im2col, cblas_sgemm and epilogue per block
    on one thread: conv.blocked_conv) where rows are wide enough for the row-copy im2col: every block, its
    padding rows above and below, a last block of fewer rows, against the reference."""
    numba_conv = pytest.importorskip("parsicore.kernels.numba_backend.conv")
    from parsicore.kernels.base import KernelContext
    from parsicore.kernels.numpy_backend import conv as numpy_conv

    attrs = ConvAttrs(stride=(stride, stride), pads=(pad,) * 4)
    out = (size + 2 * pad - 5) // stride + 1
    activation = None if act is None else Activation(act, lo=0.0, hi=6.0) if act == "clip" else Activation(act)
    case = ConvCase(attrs, seeded_array(seed, (1, 3, size, size)), seeded_array(seed + 1, (8, 3, 5, 5), scale=0.2),
                    seeded_array(seed + 2, (8,)), activation, (8, out, out))
    context = KernelContext()
    context.threads = threads
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,), activation=activation,
                      context=context)
    with constants_set(numpy_conv, BLOCKED_IM2COL_MIN=0, BLOCK_COLUMNS=block):
        kernel = factories("numba")["Conv"](spec)
    ran: list[bool] = []

    def spy(*args):  # type: ignore[no-untyped-def]
        ran.append(numba_conv.blocked_conv(*args))
        return ran[-1]

    kernel.micro = dataclasses.replace(kernel.micro, blocked_conv=spy)
    y = np.full((1, *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y])
    blas_split = pytest.importorskip("parsicore.kernels.numba_backend.blas_split")
    wide = out > numba_conv.GATHER_IM2COL_MAX_WIDTH and len(kernel.row_blocks) > 1
    assert ran == [wide and blas_split.available()]
    want, scale = expected(case)
    assert_close(y, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_stem_sized_im2col_runs_in_row_blocks(backend: str) -> None:
    """A 7x7 stride-2 stem with a column matrix past BLOCKED_IM2COL_MIN (147 x 88*88) takes row blocks, and
    matches the reference; a smaller one (80x80 outputs) does not."""
    def case(size: int) -> ConvCase:
        out = (size + 6 - 7) // 2 + 1
        return ConvCase(ConvAttrs(stride=(2, 2), pads=(3, 3, 3, 3)), seeded_array(50, (1, 3, size, size)),
                        seeded_array(51, (16, 3, 7, 7), scale=0.1), seeded_array(52, (16,)), Activation("relu"),
                        (16, out, out))

    big, small = case(176), case(160)
    kernel = factories(backend)["Conv"](_spec(big))
    assert kernel.row_blocks is not None and len(kernel.row_blocks) > 1
    assert factories(backend)["Conv"](_spec(small)).row_blocks is None
    want, scale = expected(big)
    assert_close(run_kernel(backend, big), want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases("gemm_1x1"))
def test_conv_1x1_gemm_matches_reference(backend: str, case: ConvCase) -> None:
    assert path_of(case) == "gemm_1x1"
    want, scale = expected(case)
    assert_close(run_kernel(backend, case), want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases("depthwise"))
def test_conv_depthwise_matches_reference(backend: str, case: ConvCase) -> None:
    assert path_of(case) == "depthwise"
    want, scale = expected(case)
    assert_close(run_kernel(backend, case), want, scale)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_winograd_3x3_matches_reference(backend: str, tile: int, data: st.DataObject) -> None:
    """Winograd F(2x2, 3x3) and F(4x4, 3x3), dense and gated (gathered transformed weights, active input
    channels transformed, active output rows transformed back), against the direct reference."""
    case = data.draw(winograd_cases())
    assert path_of(case) == "winograd_3x3"
    n = case.x.shape[0]
    gating = data.draw(st.sampled_from(["dense", "rows", "columns", "both"]))
    active_out = data.draw(channel_lists(case.out_shape[0], n)) if gating in ("rows", "both") else None
    active_in = data.draw(channel_lists(case.in_shape[0], n)) if gating in ("columns", "both") else None
    x = case.x if active_in is None else zero_inactive(case.x, active_in, fill=np.nan)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    with winograd_tile(tile):
        kernel = factories(backend)["Conv"](_spec(case))
    assert kernel.winograd_tile == tile
    y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
    kernel([x], [y], active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)


@pytest.mark.parametrize(("c", "size", "tile"), [(64, 56, 4), (32, 56, 4), (128, 28, 4), (64, 28, 4), (32, 28, 2),
                                                 (256, 14, 2), (64, 20, 2), (128, 20, 4)])
def test_conv_winograd_tile_size_by_work(c: int, size: int, tile: int) -> None:
    """F(4x4) from 25 4x4 tiles and C*K*tiles >= MIN_WORK_F4 (ResNet-18's layers 1-2), else F(2x2): 14x14
    outputs (16 tiles) and small channel counts keep F(2x2)."""
    spec = KernelSpec("Conv", ConvAttrs(pads=(1, 1, 1, 1)), {"weight": np.zeros((c, c, 3, 3), np.float32)},
                      ((c, size, size),), ((c, size, size),))
    assert factories("numpy")["Conv"](spec).winograd_tile == tile


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_winograd_4x4_at_network_size(backend: str) -> None:
    """F(4x4) at a size it is chosen for (64 -> 64 channels, 28x28, 49 tiles), dense and gated, within the
    tolerance of every conv path (its transforms lose more precision than F(2x2)'s)."""
    c = k = 64
    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1)), seeded_array(40, (1, c, 28, 28)),
                    seeded_array(41, (k, c, 3, 3), scale=1.0 / 24), seeded_array(42, (k,)), Activation("relu"),
                    (k, 28, 28))
    kernel = factories(backend)["Conv"](_spec(case))
    assert kernel.path == "winograd_3x3" and kernel.winograd_tile == 4
    y = np.full((1, *case.out_shape), np.nan, dtype=np.float32)
    kernel([case.x], [y])
    want, scale = expected(case)
    assert_close(y, want, scale)
    active_out, active_in = [np.arange(0, k, 3)], [np.arange(1, c, 2)]
    kernel([zero_inactive(case.x, active_in, fill=np.nan)], [y], active_out=active_out, active_in=active_in)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)


@pytest.mark.parametrize(("size", "path"), [(7, "im2col_gemm"), (10, "im2col_gemm"), (11, "winograd_3x3"),
                                            (16, "winograd_3x3")])
def test_conv_winograd_needs_min_tiles(size: int, path: str) -> None:
    """3x3 stride-1 convs take Winograd only with at least MIN_TILES (36) 2x2 output tiles: 7x7 and 10x10
    outputs (16, 25 tiles) take im2col, 11x11 (36) and larger Winograd."""
    c = k = 64
    spec = KernelSpec("Conv", ConvAttrs(pads=(1, 1, 1, 1)), {"weight": np.zeros((k, c, 3, 3), np.float32)},
                      ((c, size, size),), ((k, size, size),))
    assert conv_path(ConvGeometry.from_spec(spec)) == path


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_winograd_gated_route_per_image(backend: str) -> None:
    """A gated Winograd call picks its route per image: Winograd while the active output rows are fewer than
    3x the active input channels (winograd.gated_pays), else the gathered im2col GEMM (also with no input
    channel on). Every image matches the reference, and a dense call stays Winograd."""
    c, k, size = 20, 24, 16
    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1)), seeded_array(30, (3, c, size, size)),
                    seeded_array(31, (k, c, 3, 3), scale=0.2), seeded_array(32, (k,)), None, (k, size, size))
    kern = factories(backend)["Conv"](_spec(case))
    assert kern.path == "winograd_3x3" and kern.winograd_gated
    routes: list[str] = []
    winograd_image, gated_image = kern._winograd_image, kern._gated_image

    def spy_winograd(*args: object) -> None:
        routes.append("winograd")
        winograd_image(*args)

    def spy_gated(*args: object) -> None:
        routes.append("im2col")
        gated_image(*args)

    kern._winograd_image, kern._gated_image = spy_winograd, spy_gated
    active_out = [np.array([0, 5, 6, 23]), np.arange(k), np.arange(k)]  # R = 4, 24, 24
    active_in = [np.arange(0, c, 3), np.array([1, 2, 8, 19]), np.array([], dtype=np.int64)]  # S = 7, 4, 0
    x = zero_inactive(case.x, active_in, fill=np.nan)
    y = np.full((3, k, size, size), np.nan, dtype=np.float32)
    kern([x], [y], active_out=active_out, active_in=active_in)
    assert routes == ["winograd", "im2col", "im2col"]
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)
    routes.clear()
    y = np.full((3, k, size, size), np.nan, dtype=np.float32)
    kern([case.x], [y])
    assert routes == ["winograd"] * 3
    want, scale = expected(case)
    assert_close(y, want, scale)


@pytest.mark.parametrize("path", ["planes", "blocks", "taps3x3", "taps3x3_rows", "flat3x3"])
@given(data=st.data())
def test_conv_depthwise_numba_paths_match_reference(path: str, data: st.DataObject) -> None:
    """The numba backend's four depthwise kernels, dense and gated: 3x3 taps (dilation 1, stride 1 or 2) on
    flat planes with no per-row loops where padding is 1 above and to the left (``flat3x3``: stride 1 to
    the input's size, or stride 2 on even widths), else in one pass over phase planes (``taps3x3_rows``:
    every output row straight from its taps, bias and clamp, as rows of FUSED_DEPTHWISE_MIN_WIDTH or more
    take it without an activation, with ReLU or clip; ``taps3x3``: never); other kernels on flat padded
    planes for large outputs and channels-last blocks for output planes of at most SMALL_PLANE pixels."""
    numba_conv = pytest.importorskip("parsicore.kernels.numba_backend.conv")
    small = numba_conv.SMALL_PLANE
    taps = path.startswith("taps3x3") or path == "flat3x3"
    bounds = (1, 10_000) if taps else {"planes": (small + 1, 10_000), "blocks": (1, small)}[path]
    case = data.draw(depthwise_cases(*bounds, taps3x3=taps, pad_one=path == "flat3x3"))
    want_path = "taps3x3" if path.startswith("taps3x3") else path
    assume(numba_conv.depthwise_path(ConvGeometry.from_spec(_spec(case))) == want_path)
    n, c = case.x.shape[:2]
    gating = data.draw(st.sampled_from(["dense", "rows", "columns", "both"]))
    active_out = data.draw(channel_lists(c, n)) if gating in ("rows", "both") else None
    active_in = data.draw(channel_lists(c, n)) if gating in ("columns", "both") else None
    x = case.x if active_in is None else zero_inactive(case.x, active_in, fill=np.nan)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_conv, "FUSED_DEPTHWISE_MIN_WIDTH", 1 if path == "taps3x3_rows" else 1 << 30)
        got = run_kernel("numba", case, x, active_out=active_out, active_in=active_in)
    assert_close(got, want, scale)


@pytest.mark.parametrize("stride, size, bottom", [(1, 7, 1), (1, 14, 1), (1, 1, 1), (1, 5, 1), (2, 14, 1),
                                                  (2, 28, 0), (2, 13, 1), (2, 2, 0), (2, 6, 1)])
@pytest.mark.parametrize("act", [None, "clip", "leaky_relu"])
def test_conv_depthwise_flat_3x3_edges_and_non_finite_inputs(stride: int, size: int, bottom: int,
                                                            act: str | None) -> None:
    """The flat 3x3 depthwise kernel at MobileNetV2's plane sizes and small ones, with inf and NaN in the
    first and last column and row of some planes: its left and right taps of the edge columns read the
    neighbouring row and must drop it, not multiply it by 0 (inf * 0 is NaN). Against the reference, outputs
    NaN-filled beforehand, every element compared, non-finite ones where the reference has them."""
    numba_conv = pytest.importorskip("parsicore.kernels.numba_backend.conv")
    c, h = 6, size
    w = size if stride == 1 or size % 2 == 0 else size + 1
    x = seeded_array(41, (2, c, h, w))
    x[0, 1, :, -1] = np.inf
    x[0, 2, :, 0] = -np.inf
    x[1, 3, 0, :] = np.nan
    x[1, 4, -1, :] = np.inf
    x[1, 5, h // 2, w - 1] = np.nan
    attrs = ConvAttrs(stride=(stride, stride), pads=(1, 1, bottom, bottom), groups=c)
    ho = (h + 1 + bottom - 3) // stride + 1
    wo = (w + 1 + bottom - 3) // stride + 1
    activation = {None: None, "clip": Activation("clip", lo=0.0, hi=6.0),
                  "leaky_relu": Activation("leaky_relu", alpha=0.1)}[act]
    case = ConvCase(attrs, x, seeded_array(42, (c, 1, 3, 3)), seeded_array(43, (c,)), activation, (c, ho, wo))
    assert numba_conv.depthwise_path(ConvGeometry.from_spec(_spec(case))) == "flat3x3"
    with np.errstate(invalid="ignore", over="ignore"):
        want, _ = expected(case)
    got = run_kernel("numba", case)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    scale = max(1.0, float(np.abs(x[np.isfinite(x)]).max()))
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_depthwise_3x3_every_small_geometry_matches_reference(stride: int) -> None:
    """Every padding 0..2 on each side of 5- and 6-high and wide planes, 3x3 depthwise: whichever kernel the
    numba backend picks for the geometry (the flat one only where flat_3x3_fits says so) matches the
    reference, so a rule that admits a geometry its kernel does not serve fails here."""
    pytest.importorskip("parsicore.kernels.numba_backend.conv")
    c = 2
    for pads in itertools.product(range(3), repeat=4):
        for h, w in itertools.product((5, 6), repeat=2):
            ho = (h + pads[0] + pads[2] - 3) // stride + 1
            wo = (w + pads[1] + pads[3] - 3) // stride + 1
            seed = 50 + sum(pads) + h + w
            case = ConvCase(ConvAttrs(stride=(stride, stride), pads=pads, groups=c), seeded_array(seed, (1, c, h, w)),
                            seeded_array(seed + 1, (c, 1, 3, 3)), seeded_array(seed + 2, (c,)), None, (c, ho, wo))
            want, scale = expected(case)
            assert_close(run_kernel("numba", case), want, scale)


@pytest.mark.parametrize("path", ["rows", "gather"])
@given(data=st.data())
def test_conv_im2col_numba_kernels_match_reference(path: str, data: st.DataObject) -> None:
    """The numba backend's two im2col kernels, dense and gated (channel subsets): row copies with clipped
    ranges (wide outputs), and loads through a per-call index map from a zero-padded plane (outputs at
    most GATHER_IM2COL_MAX_WIDTH wide). The bar is moved so that either kernel meets every case."""
    numba_conv = pytest.importorskip("parsicore.kernels.numba_backend.conv")
    case = data.draw(conv_cases(data.draw(st.sampled_from(["im2col_gemm", "grouped"]))))
    assume(path_of(case) in ("im2col_gemm", "grouped"))
    active_in = data.draw(st.one_of(st.none(), channel_lists(case.in_shape[0], case.x.shape[0])))
    x = case.x if active_in is None else zero_inactive(case.x, active_in, fill=np.nan)
    want, scale = expected(case, active_in=active_in)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_conv, "GATHER_IM2COL_MAX_WIDTH", 1 << 30 if path == "gather" else -1)
        got = run_kernel("numba", case, x, active_in=active_in)
    assert_close(got, want, scale)


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("left", [0, 1, 2, 3])
@pytest.mark.parametrize("width", [7, 8, 15, 33])
def test_conv_im2col_rows_kernel_at_stride_two_matches_reference(kernel: int, left: int, width: int) -> None:
    """The row-copy im2col at column stride 2 (ResNet's stem and its stride-2 3x3 convs): every input row split
    into its even and odd columns, odd and even widths, every column padding, so that taps read the last column
    of either parity; against the reference."""
    numba_conv = pytest.importorskip("parsicore.kernels.numba_backend.conv")
    if kernel > width + 2 * left:
        return
    attrs = ConvAttrs(stride=(2, 2), pads=(1, left, 1, left))
    c, k, h = 2, 3, 9
    x = seeded_array(31, (1, c, h, width))
    weight = seeded_array(32, (k, c, kernel, kernel), scale=0.3)
    ho = (h + 2 - kernel) // 2 + 1
    wo = (width + 2 * left - kernel) // 2 + 1
    if ho < 1:
        return
    case = ConvCase(attrs, x, weight, seeded_array(33, (k,)), None, (k, ho, wo))
    want, scale = expected(case)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_conv, "GATHER_IM2COL_MAX_WIDTH", -1)  # the row-copy kernel at every width
        got = run_kernel("numba", case)
    assert_close(got, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases("grouped"))
def test_conv_grouped_im2col_gemm_matches_reference(backend: str, case: ConvCase) -> None:
    assert path_of(case) in ("im2col_gemm", "gemm_1x1")
    want, scale = expected(case)
    assert_close(run_kernel(backend, case), want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
@given(data=st.data())
def test_conv_fused_activation_every_kind(backend: str, kind: str, data: st.DataObject) -> None:
    case = data.draw(conv_cases(data.draw(st.sampled_from(["im2col_gemm", "depthwise"])), activation=False))
    case = ConvCase(case.attrs, case.x * 3, case.weight, case.bias, data.draw(activation_of_kind(kind)),
                    case.out_shape)  # x*3 spreads values over the activations' bends
    want, scale = expected(case)
    assert_close(run_kernel(backend, case), want, scale)


# --- gated paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_gated_rows_matches_reference(backend: str, data: st.DataObject) -> None:
    """active_out only: the GEMM on the active rows of the packed weight, zeros elsewhere."""
    case = data.draw(conv_cases(data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1", "grouped", "depthwise"]))))
    active_out = data.draw(channel_lists(case.out_shape[0], case.x.shape[0]))
    want, scale = expected(case, active_out=active_out)
    assert_close(run_kernel(backend, case, active_out=active_out), want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_gated_columns_matches_reference(backend: str, data: st.DataObject) -> None:
    """active_in only: im2col and weight columns of the active input channels only."""
    case = data.draw(conv_cases(data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1", "grouped", "depthwise"]))))
    active_in = data.draw(channel_lists(case.in_shape[0], case.x.shape[0]))
    want, scale = expected(case, active_in=active_in)
    got = run_kernel(backend, case, zero_inactive(case.x, active_in), active_in=active_in)
    assert_close(got, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_gated_rows_and_columns_matches_reference(backend: str, data: st.DataObject) -> None:
    case = data.draw(conv_cases(data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1", "grouped", "depthwise"]))))
    n = case.x.shape[0]
    active_out = data.draw(channel_lists(case.out_shape[0], n))
    active_in = data.draw(channel_lists(case.in_shape[0], n))
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    got = run_kernel(backend, case, zero_inactive(case.x, active_in), active_out=active_out, active_in=active_in)
    assert_close(got, want, scale)


def _compact(x: np.ndarray, lists: list[np.ndarray]) -> np.ndarray:
    """A NaN buffer of x's shape holding, per image, x's channels ``lists[n]`` in its first planes."""
    out = np.full(x.shape, np.nan, dtype=np.float32)
    for n, chans in enumerate(lists):
        out[n, :chans.size] = x[n, chans]
    return out


def _expand(y: np.ndarray, lists: list[np.ndarray]) -> np.ndarray:
    """The full tensor of a compact y: channel lists[n][j] from plane j, every other channel 0."""
    out = np.zeros_like(y)
    for n, rows in enumerate(lists):
        out[n, rows] = y[n, :rows.size]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_channel_compact_layouts_match_reference(backend: str, data: st.DataObject) -> None:
    """compact_in (the active input channels packed in the first planes) and compact_out (the active output
    channels written to the first planes, the other planes left alone) on every path that takes them
    (im2col, 1x1, Winograd, depthwise; ``depthwise_flat``: the 3x3 geometries of numba's flat kernel, which
    reads the active channels' filters in place), against the dense reference with masked channels."""
    kind = data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1", "winograd_3x3", "winograd_4x4", "depthwise",
                                      "depthwise_flat"]))
    if kind.startswith("winograd"):
        case = data.draw(winograd_cases())
    elif kind == "depthwise_flat":
        case = data.draw(depthwise_cases(taps3x3=True, pad_one=True))
    else:
        case = data.draw(conv_cases(kind))
    tile = 4 if kind == "winograd_4x4" else 2
    kind = {"winograd_4x4": "winograd_3x3", "depthwise_flat": "depthwise"}.get(kind, kind)
    assert path_of(case) == kind
    n, c, k = case.x.shape[0], case.in_shape[0], case.out_shape[0]
    compact_in, compact_out = data.draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    if kind == "depthwise":
        compact_out = True  # a depthwise conv reads a compact input only into a compact output, same channels
    active_out = data.draw(channel_lists(k, n))
    active_in = active_out if kind == "depthwise" and compact_in else data.draw(channel_lists(c, n))
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    x = _compact(case.x, active_in) if compact_in else zero_inactive(case.x, active_in)
    y = np.full((n, *case.out_shape), np.nan, dtype=np.float32)
    with winograd_tile(tile):
        kernel = factories(backend)["Conv"](_spec(case))
    kernel([x], [y], active_out=active_out, active_in=active_in, compact_in=compact_in, compact_out=compact_out)
    if compact_out:
        for i, rows in enumerate(active_out):
            assert np.isnan(y[i, rows.size:]).all(), "planes past the active channels must stay unwritten"
        y = _expand(y, active_out)
    assert_close(y, want, scale)


def test_conv_compact_depthwise_needs_matching_channels() -> None:
    """A depthwise conv asked to read a compact input into other output channels refuses (ValueError)."""
    c = 8
    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1), groups=c), seeded_array(40, (1, c, 6, 6)),
                    seeded_array(41, (c, 1, 3, 3)), None, None, (c, 6, 6))
    kernel = factories("numpy")["Conv"](_spec(case))
    y = np.empty((1, c, 6, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="same channels"):
        kernel([case.x], [y], active_out=[np.array([0, 1])], active_in=[np.array([2, 3])], compact_in=True,
               compact_out=True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_gated_skips_inactive_input_channels(backend: str, data: st.DataObject) -> None:
    """Inactive input channels hold NaN: had any kernel read them, NaN would reach the output."""
    case = data.draw(conv_cases(data.draw(st.sampled_from(["im2col_gemm", "gemm_1x1", "grouped", "depthwise"]))))
    n = case.x.shape[0]
    active_in = data.draw(channel_lists(case.in_shape[0], n))
    active_out = data.draw(st.one_of(st.none(), channel_lists(case.out_shape[0], n)))
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    got = run_kernel(backend, case, zero_inactive(case.x, active_in, fill=np.nan),
                     active_out=active_out, active_in=active_in)
    assert not np.isnan(got).any()
    assert_close(got, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_gated_skips_inactive_output_channels(backend: str) -> None:
    """An inactive output row is never computed: a NaN in its weights cannot reach the output."""
    weight = seeded_array(1, (6, 4, 3, 3))
    weight[2] = np.nan
    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1)), seeded_array(2, (2, 4, 5, 5)), weight, seeded_array(3, (6,)),
                    None, (6, 5, 5))
    active_out = [np.array([0, 1, 3, 5]), np.array([4])]
    got = run_kernel(backend, case, active_out=active_out)
    assert not np.isnan(got).any()
    clean = ConvCase(case.attrs, case.x, np.nan_to_num(weight), case.bias, None, case.out_shape)
    want, scale = expected(clean, active_out=active_out)
    assert_close(got, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_gated_depthwise_inactive_input_is_activated_bias(backend: str) -> None:
    """A depthwise channel whose input is inactive is act(bias) everywhere (sigmoid(b) != 0 shows it)."""

    c = 5
    bias = seeded_array(4, (c,))
    case = ConvCase(ConvAttrs(groups=c, pads=(1, 1, 1, 1)), seeded_array(5, (1, c, 4, 4)),
                    seeded_array(6, (c, 1, 3, 3)), bias, Activation("sigmoid"), (c, 4, 4))
    active_in = [np.array([0, 3])]
    got = run_kernel(backend, case, zero_inactive(case.x, active_in, fill=np.nan), active_in=active_in)
    for ch in (1, 2, 4):
        np.testing.assert_allclose(got[0, ch], np.full((4, 4), 1 / (1 + np.exp(-bias[ch]))), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_rejects_bad_gating_lists(backend: str) -> None:
    case = ConvCase(ConvAttrs(), seeded_array(7, (2, 3, 4, 4)), seeded_array(8, (4, 3, 3, 3)), None, None, (4, 2, 2))
    with pytest.raises(ValueError):
        run_kernel(backend, case, active_out=[np.array([0])])  # one list for two images
    with pytest.raises(ValueError):
        run_kernel(backend, case, active_in=[np.array([0, 3]), np.array([1])])  # channel 3 of 3


# --- scratch memory and threads -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_scratch_is_allocated_once(backend: str) -> None:
    """im2col columns and gathered weights live in the context's per-thread scratch: after the first call
    (dense, then gated) no call grows it, and the buffer is the same array."""
    from parsicore.kernels.base import KernelContext

    context = KernelContext()
    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1)), seeded_array(11, (2, 6, 9, 9)), seeded_array(12, (8, 6, 3, 3)),
                    seeded_array(13, (8,)), None, (8, 9, 9))
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,), context=context)
    kernel = factories(backend)["Conv"](spec)
    y = np.empty((2, *case.out_shape), dtype=np.float32)
    gating = {"active_out": [np.array([0, 2, 5]), np.arange(8)], "active_in": [np.array([1, 4]), np.array([0])]}
    kernel([case.x], [y])
    kernel([case.x], [y], **gating)
    buffer = context._scratch
    for _ in range(3):
        kernel([case.x], [y])
        kernel([case.x], [y], **gating)
    assert context._scratch is buffer
    want, scale = expected(case, **gating)
    assert_close(y, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_one_kernel_many_threads(backend: str) -> None:
    """One kernel (one shared context) called from several threads at once: each thread has its own scratch."""

    from parsicore.kernels.base import KernelContext

    case = ConvCase(ConvAttrs(pads=(1, 1, 1, 1)), seeded_array(14, (1, 8, 12, 12)), seeded_array(15, (16, 8, 3, 3)),
                    seeded_array(16, (16,)), None, (16, 12, 12))
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,), context=KernelContext())
    kernel = factories(backend)["Conv"](spec)
    inputs = [seeded_array(100 + i, (1, 8, 12, 12)) for i in range(8)]
    wants = []
    for x in inputs:
        want, _ = expected(ConvCase(case.attrs, x, case.weight, case.bias, None, case.out_shape))
        wants.append(want)

    def worker(k: int) -> None:
        y = np.empty((1, *case.out_shape), dtype=np.float32)
        for _ in range(20):
            for i in range(k, 8, 4):
                kernel([inputs[i]], [y], active_in=[np.arange(8)] if i % 2 else None)
                np.testing.assert_allclose(y, wants[i], rtol=1e-4, atol=1e-4)

    run_in_threads(worker, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["rows", "columns", "winograd", "winograd_4x4"])
def test_conv_gemm_split_over_threads_matches_reference(backend: str, shape: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With threads > 1 large GEMMs are split into chunks (row blocks, column blocks, Winograd slices) run by
    the caller and helper threads (numpy backend) or by Numba's pool, one OpenBLAS call per chunk (numba backend,
    blas_split): dense and gated results still match the reference."""
    from parsicore.kernels.base import KernelContext
    from parsicore.kernels.numpy_backend import conv as numpy_conv

    splits: list[int] = []

    def counting_run_chunks(task, count, threads):  # type: ignore[no-untyped-def]
        splits.append(count)
        return run_chunks(task, count, threads)

    from parsicore.threads import run_chunks

    monkeypatch.setattr(numpy_conv, "run_chunks", counting_run_chunks)
    monkeypatch.setattr(numpy_conv, "PARALLEL_GEMM_MACS", 0)  # small shapes, split anyway (the threshold is tuned)
    monkeypatch.setattr(numpy_conv, "PARALLEL_WINOGRAD_MACS", 0)  # F(4x4): the whole conv on the threads
    own_pool = False
    if backend == "numba":  # the wide 1x1 ("columns") takes BLAS here, not the row GEMM (which splits itself)
        row_gemm = pytest.importorskip("parsicore.kernels.numba_backend.row_gemm")
        monkeypatch.setattr(row_gemm, "WIDE_MIN_COLUMNS", 1 << 62)
        from parsicore.kernels.numba_backend import blas_split, parallel

        monkeypatch.setattr(parallel, "MIN_PARALLEL_MACS", 0)
        own_pool = blas_split.available()
    c, k, size, kernel = {"rows": (64, 96, 6, 1), "columns": (96, 8, 56, 1), "winograd": (48, 48, 20, 3),
                          "winograd_4x4": (64, 64, 28, 3)}[shape]
    pads = (kernel // 2,) * 4
    case = ConvCase(ConvAttrs(pads=pads), seeded_array(20, (2, c, size, size)),
                    seeded_array(21, (k, c, kernel, kernel), scale=0.1), seeded_array(22, (k,)), None, (k, size, size))
    context = KernelContext()
    context.threads = 3
    spec = KernelSpec("Conv", case.attrs, case.weights, (case.in_shape,), (case.out_shape,), context=context)
    kern = factories(backend)["Conv"](spec)
    assert (kern.path == "winograd_3x3") == shape.startswith("winograd")
    assert getattr(kern, "winograd_tile", None) == {"winograd": 2, "winograd_4x4": 4}.get(shape)
    transforms: list[object] = []  # the `parallel` choice each Winograd transform was called with

    def spy(transform):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            transforms.append(args[8] if len(args) > 8 else kwargs.get("parallel"))
            return transform(*args, **kwargs)
        return run

    pool_splits: list[tuple[int, ...]] = []  # a's shape at each split_matmul call that ran

    def counting_split(split_matmul):  # type: ignore[no-untyped-def]
        def run(a, b, out, threads, by_rows):  # type: ignore[no-untyped-def]
            ran = split_matmul(a, b, out, threads, by_rows)
            if ran:
                pool_splits.append(a.shape)
            return ran
        return run

    kern.micro = dataclasses.replace(kern.micro, winograd_input=spy(kern.micro.winograd_input),
                                     winograd_output=spy(kern.micro.winograd_output),
                                     split_matmul=counting_split(kern.micro.split_matmul)
                                     if kern.micro.split_matmul else None)
    y = np.full((2, *case.out_shape), np.nan, dtype=np.float32)
    kern([case.x], [y])
    if own_pool:
        assert pool_splits and not splits, "the GEMM should have been split in Numba's pool"
    else:
        assert splits and all(n > 1 for n in splits), "the GEMM should have been split"
    # F(4x4) runs its transforms in their parallel builds with the split GEMM; F(2x2)'s choose by size
    assert transforms == {"winograd": [None] * 4, "winograd_4x4": [True] * 4}.get(shape, [])
    want, scale = expected(case)
    assert_close(y, want, scale)
    active_out = [np.arange(0, k, 2), np.arange(k)]
    active_in = [np.arange(c), np.arange(1, c, 3)]
    x = zero_inactive(case.x, active_in)
    kern([x], [y], active_out=active_out, active_in=active_in)
    want, scale = expected(case, active_out=active_out, active_in=active_in)
    assert_close(y, want, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**16), blocks=st.integers(1, 16), k=st.integers(1, 40), length=st.integers(1, 70),
       data=st.data())
def test_gather_rows_microkernel_matches_indexing(backend: str, seed: int, blocks: int, k: int, length: int,
                                                  data: st.DataObject) -> None:
    """The whole-row gather (weight rows of output-gated convs, active inputs of gated 1x1 convs) is src[:, rows]."""
    module = {"numpy": "parsicore.kernels.numpy_backend.conv", "numba": "parsicore.kernels.numba_backend.gather"}
    gather_rows = pytest.importorskip(module[backend]).gather_rows
    src = seeded_array(seed, (blocks, k, length))
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, k - 1), min_size=1))), dtype=np.int64)
    out = np.full((blocks, rows.size, length), np.nan, dtype=np.float32)
    gather_rows(src, rows, out)
    np.testing.assert_array_equal(out, src[:, rows])


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 40), length=st.integers(1, 70), data=st.data())
def test_zero_other_rows_microkernel_zeroes_exactly_the_inactive_rows(backend: str, seed: int, k: int, length: int,
                                                                      data: st.DataObject) -> None:
    """A gated conv's inactive output planes: every row not in ``rows`` becomes 0, the active ones keep their
    values (none to all rows active)."""
    module = {"numpy": "parsicore.kernels.numpy_backend.conv", "numba": "parsicore.kernels.numba_backend.gather"}
    zero_other_rows = pytest.importorskip(module[backend]).zero_other_rows
    y = seeded_array(seed, (k, length))
    before = y.copy()
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, k - 1)))), dtype=np.int64)
    zero_other_rows(y, rows)
    for row in range(k):
        if row in set(rows.tolist()):
            np.testing.assert_array_equal(y[row], before[row])
        else:
            assert not y[row].any(), row

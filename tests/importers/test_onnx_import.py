"""ONNX importer: torch.onnx.export (TorchScript exporter, dynamo=False: the new exporter needs onnxscript,
which is not installed) of the test architectures at opsets 13 and 17, then parsicore (numpy backend) against
onnxruntime on the same file. Tolerance: 1e-4 relative to the output scale, identical top-1.

Small inputs keep the run short on a shared 2-core machine: the nets at 32x32 (gated net 16x16), ResNet-18
at 64x64; full-size runs are in tests/export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from parsicore.api import load  # noqa: E402
from parsicore.builder import ModelBuilder  # noqa: E402
from parsicore.check import check_onnx, check_selftest  # noqa: E402
from parsicore.cli import main  # noqa: E402
from parsicore.errors import ConversionError  # noqa: E402
from parsicore.export.torch_modules import LKAMGate, TopKGate  # noqa: E402
from parsicore.format import NAME_RE, read_model  # noqa: E402
from parsicore.importers.onnx_import import import_onnx, sanitise_name  # noqa: E402
from tests import _torch_archs as archs  # noqa: E402

RTOL = 1e-4


def export_onnx(module: torch.nn.Module, shape: tuple[int, ...], path: Path, opset: int, functions: bool = False,
                dynamic: bool = False, fold: bool = True) -> Path:
    """torch.onnx.export with a batch of 2 (dynamic batch axis when ``dynamic``)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32))
    kwargs: dict = {}
    if functions:
        kwargs["export_modules_as_functions"] = {LKAMGate, TopKGate}
    if dynamic:
        kwargs["dynamic_axes"] = {"x": {0: "n"}, "y": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), opset_version=opset, dynamo=False, input_names=["x"],
                          output_names=["y"], do_constant_folding=fold, **kwargs)
    return path


def _check(model_file: object, path: Path, seed: int = 1) -> None:
    report = check_onnx(load(model_file, backend="numpy"), path, seed=seed)
    (out,) = report.outputs
    assert out.max_rel <= RTOL, f"max rel error {out.max_rel:.3g}"
    assert out.top1 is None or out.top1[0] == out.top1[1]
    assert report.passed


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize(("arch", "size"), [("vgg_small", 32), ("op_zoo", 32), ("mobilenet_v2", 32),
                                            ("resnet18", 64)])
def test_architectures_match_onnxruntime(arch: str, size: int, opset: int, tmp_path: Path) -> None:
    path = export_onnx(archs.ARCHITECTURES[arch](), (3, size, size), tmp_path / f"{arch}.onnx", opset)
    model_file = import_onnx(path, selftest=False)
    assert all(NAME_RE.match(n.name) for n in model_file.nodes)
    _check(model_file, path)


@pytest.mark.parametrize(("opset", "functions", "dynamic"), [(13, False, False), (17, True, False),
                                                             (17, False, True), (11, False, True)])
def test_gated_model_comes_back_gated(opset: int, functions: bool, dynamic: bool, tmp_path: Path) -> None:
    """Inline gates (any opset), gates as ONNX functions (opset 15+), dynamic batch (ConstantOfShape zeros)."""
    module = archs.gated_net()
    path = export_onnx(module, (3, 16, 16), tmp_path / "gated.onnx", opset, functions, dynamic)
    model_file = import_onnx(path, selftest=False)
    gates = [n for n in model_file.nodes if n.op in ("LKAMGate", "TopKGate")]
    assert [n.op for n in gates] == ["LKAMGate", "LKAMGate", "TopKGate", "TopKGate"]
    assert sum(n.op == "ChannelMask" for n in model_file.nodes) == 4
    a = [dict(n.attrs) for n in gates]
    assert (a[0]["mode"], a[0]["threshold"], a[0]["activation"], a[0]["kernel_size"]) == ("hard", 0.5, "relu", 1)
    assert (a[1]["mode"], a[1]["pool"], a[1]["kernel_size"]) == ("scaled", "max", 3)
    assert a[1]["threshold"] == pytest.approx(0.6)
    assert (a[2]["keep_ratio"], a[2]["scaled"], a[2]["activation"]) == (0.5, True, "relu")
    assert (a[3]["keep_ratio"], a[3]["scaled"], a[3]["activation"], a[3]["pool"]) == (20 / 64, False, "none", "max")
    model = load(model_file, backend="numpy")
    assert len(model.plan.gated_steps) == 4
    _check(model_file, path)


def test_batchnorm_and_unfolded_shape_arithmetic(tmp_path: Path) -> None:
    """do_constant_folding=False keeps BatchNormalization nodes and the Shape/Gather/Unsqueeze/Concat/Reshape
    arithmetic around view(x.size(0), ...), folded at import (opset 11: Unsqueeze axes as an attribute)."""
    path = export_onnx(archs.op_zoo(), (3, 32, 32), tmp_path / "zoo.onnx", 11, fold=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"BatchNormalization", "Shape", "Gather", "Unsqueeze", "ConstantOfShape"} <= ops
    model_file = import_onnx(path, selftest=False)
    assert "BatchNorm" in {n.op for n in model_file.nodes}
    _check(model_file, path)


def test_selftest_embedded_and_reproduced(tmp_path: Path) -> None:
    path = export_onnx(archs.vgg_small(), (3, 32, 32), tmp_path / "vgg.onnx", 13)
    model_file = import_onnx(path)
    assert model_file.selftest_inputs["x"].shape == (2, 3, 32, 32)
    assert len(model_file.metadata["weights_sha256"]) == 64
    assert model_file.metadata["onnx"] == {"opset": 13, "inputs": ["x"], "outputs": ["y"]}
    assert check_selftest(load(model_file, backend="numpy")).passed


def _tensor(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes: list, inits: list, in_shape: tuple[int, ...], opset: int = 13, out: str = "y",
           functions: list | None = None, extra_opsets: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in extra_opsets]]
    return helper.make_model(graph, opset_imports=opsets, functions=functions or [])


def test_hand_built_ops_match_onnxruntime(tmp_path: Path) -> None:
    """Attributes torch never emits: auto_pad SAME_UPPER, default pool strides, Gemm transB=0 with alpha,
    beta and a (1, K) C, MatMul + Add, Clip with only a max, Pad with a value, Reshape with 0, Squeeze."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b_gemm = rng.standard_normal((6, 5)).astype(np.float32)
    c_gemm = rng.standard_normal((1, 5)).astype(np.float32)
    w_mm = rng.standard_normal((5, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"], name="normalise/sub"),
        helper.make_node("Div", ["s", "std"], ["n"], name="normalise/div"),
        helper.make_node("Conv", ["n", "w"], ["c"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("LeakyRelu", ["c"], ["l"], name="lrelu", alpha=0.2),
        helper.make_node("Clip", ["l", "", "six"], ["k"], name="clip"),
        helper.make_node("Pad", ["k", "pads", "half"], ["p"], name="pad"),
        helper.make_node("AveragePool", ["p"], ["a"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("MaxPool", ["a"], ["m"], name="max", kernel_shape=[2, 2]),
        helper.make_node("HardSigmoid", ["m"], ["h"], name="hsig", alpha=0.3, beta=0.4),
        helper.make_node("GlobalMaxPool", ["h"], ["g"], name="gmp"),
        helper.make_node("Squeeze", ["g", "axes23"], ["q"], name="squeeze"),
        helper.make_node("Reshape", ["q", "shape0"], ["r"], name="reshape"),
        helper.make_node("Dropout", ["r"], ["d"], name="drop"),
        helper.make_node("Gemm", ["d", "bg", "cg"], ["f"], name="gemm", alpha=0.5, beta=2.0, transB=0),
        helper.make_node("Identity", ["f"], ["i"], name="ident"),
        helper.make_node("MatMul", ["i", "wm"], ["mm"], name="matmul"),
        helper.make_node("Add", ["bm", "mm"], ["z"], name="bias"),
        helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1),
    ]
    inits = [_tensor("mean", np.array([0.1, 0.2, 0.3], np.float32).reshape(1, 3, 1, 1)),
             _tensor("std", np.float32(0.5)), _tensor("w", w), _tensor("six", np.float32(6.0)),
             _tensor("pads", np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64)), _tensor("half", np.float32(0.5)),
             _tensor("axes23", np.array([2, 3], np.int64)), _tensor("shape0", np.array([0, 6], np.int64)),
             _tensor("bg", b_gemm), _tensor("cg", c_gemm), _tensor("wm", w_mm),
             _tensor("bm", rng.standard_normal(4).astype(np.float32))]
    model = _model(nodes, inits, (2, 3, 15, 17))
    path = tmp_path / "hand.onnx"
    onnx.save(model, str(path))
    model_file = import_onnx(path)
    assert {n.name for n in model_file.nodes} >= {"normalise.sub", "conv", "gemm", "softmax"}
    _check(model_file, path)


def test_explicit_parsicore_domain_gate_nodes() -> None:
    """ai.parsicore nodes carry the parsicore attributes; onnxruntime cannot run them (no self-test)."""
    rng = np.random.default_rng(1)
    w = {"w1": rng.standard_normal((4, 3, 1, 1)), "b1": rng.standard_normal(4),
         "w2": rng.standard_normal((5, 4, 1, 1)), "b2": rng.standard_normal(5)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    conv_w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("LKAMGate", ["x", "w1", "b1", "w2", "b2"], ["m"], name="gate", domain="ai.parsicore",
                         threshold=0.5, mode="scaled", pool="avg", activation="relu"),
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ChannelMask", ["r", "m"], ["y"], name="mask", domain="ai.parsicore"),
    ]
    inits = [_tensor(k, v) for k, v in w.items()] + [_tensor("cw", conv_w)]
    model_file = import_onnx(_model(nodes, inits, (1, 3, 6, 6), extra_opsets=("ai.parsicore",)))
    assert not model_file.selftest_inputs
    b = ModelBuilder("ref")
    b.add_input("x", (None, 3, 6, 6))
    b.add_node("LKAMGate", ["x"], ["m"], name="gate", attrs={"threshold": 0.5, "mode": "scaled"}, weights=w)
    b.add_node("Conv", ["x"], ["c"], name="conv", attrs={"pads": [1, 1, 1, 1]}, weights={"weight": conv_w})
    b.add_node("Relu", ["c"], ["r"], name="relu")
    b.add_node("ChannelMask", ["r", "m"], ["y"], name="mask")
    b.add_output("y")
    x = rng.standard_normal((3, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(load(model_file, backend="numpy")(x), load(b.build(), backend="numpy")(x))


def _unsupported_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Elu", ["x"], ["e"], name="act/elu"),
             helper.make_node("Transpose", ["e"], ["t"], name="t1", perm=[0, 1, 3, 2]),
             helper.make_node("Transpose", ["t"], ["u"], name="t2", perm=[0, 1, 3, 2]),
             helper.make_node("Foo", ["u"], ["v"], name="foo", domain="com.example"),
             helper.make_node("Relu", ["v"], ["y"], name="relu")]
    return _model(nodes, [], (1, 3, 4, 4), extra_opsets=("com.example",))


def test_unsupported_ops_all_listed() -> None:
    with pytest.raises(ConversionError) as info:
        import_onnx(_unsupported_model())
    msg = str(info.value)
    assert "Elu (node 'act/elu')" in msg and "Transpose (nodes 't1', 't2')" in msg
    assert "com.example:Foo (node 'foo')" in msg and "Relu" not in msg


def test_convert_command_unsupported_exits_2_without_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "bad.onnx", tmp_path / "bad.h5"
    onnx.save(_unsupported_model(), str(src))
    with pytest.raises(SystemExit) as info:
        main(["convert", str(src), "-o", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("parsicore: error:") and "Transpose (nodes 't1', 't2')" in err
    assert err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_convert_command_float16(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARSICORE_BACKEND", "numpy")
    src = export_onnx(archs.gated_net(), (3, 16, 16), tmp_path / "gated.onnx", 13)
    out = tmp_path / "gated.h5"
    with pytest.raises(SystemExit) as info:
        main(["convert", str(src), "-o", str(out), "--float16"])
    assert info.value.code == 0
    assert "4 gate(s)" in capsys.readouterr().out
    model_file = read_model(out)
    assert model_file.float16_weights
    with pytest.raises(SystemExit) as info:
        main(["check", str(out)])
    assert info.value.code == 0, capsys.readouterr().out


def test_old_opset_refused() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [], (1, 3, 4, 4), opset=10)
    with pytest.raises(ConversionError, match="opset 10 is not supported"):
        import_onnx(model)


def test_gate_function_with_foreign_body_refused() -> None:
    body = [helper.make_node("Sigmoid", ["a"], ["b"])]
    fn = helper.make_function("ai.parsicore", "LKAMGate", ["a"], ["b"], body,
                              [helper.make_opsetid("", 13)])
    nodes = [helper.make_node("LKAMGate", ["x"], ["y"], name="g", domain="ai.parsicore")]
    model = _model(nodes, [], (1, 3, 4, 4), functions=[fn], extra_opsets=("ai.parsicore",))
    with pytest.raises(ConversionError, match="does not follow the ONNX gate convention"):
        import_onnx(model, selftest=False)


def test_names_sanitised() -> None:
    assert sanitise_name("/layer1/layer1.0/conv1/Conv") == "layer1.layer1.0.conv1.Conv"
    assert sanitise_name("onnx::Conv_12 (x)") == "onnx::Conv_12__x_"
    assert sanitise_name("") == "node" and NAME_RE.match(sanitise_name("a" * 500))

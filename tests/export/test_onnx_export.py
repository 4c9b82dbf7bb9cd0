"""ONNX export: onnxruntime on the exported file against parsicore (numpy backend) on the same weights.

Tolerance: 1e-4 relative to the output scale (max |parsicore output|), as the importers' checks. Models: the
op zoo (every op of the table), tests/models.py's small_cnn and gated_cnn in every gate variant, with random
weights over several seeds. Gated exports must also round-trip through the ONNX importer *gated* (FORMAT.md,
"ONNX gate convention"), giving the same outputs and the same executed MACs.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from parsicore.api import load  # noqa: E402
from parsicore.errors import ConversionError  # noqa: E402
from parsicore.export import onnx_export  # noqa: E402
from parsicore.export.onnx_export import export_onnx  # noqa: E402
from parsicore.format import ModelFile  # noqa: E402
from parsicore.ops import OPS  # noqa: E402
from tests.export._compare import GATED_VARIANTS, assert_outputs_close, model_input  # noqa: E402
from tests.export._parsicore_zoo import zoo_model  # noqa: E402
from tests.models import gated_cnn, small_cnn  # noqa: E402

GATED_VARIANTS = {**GATED_VARIANTS, "lkam-mostly-off": {"offset": -2.0}}


def _ort_outputs(model_file: ModelFile, x: np.ndarray, **overrides: float) -> dict[str, np.ndarray]:
    proto = export_onnx(model_file, **overrides)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {model_file.inputs[0].name: x})))


def test_every_op_has_a_mapping() -> None:
    missing = [op for op in OPS if not hasattr(onnx_export._Writer, f"_op_{op}")]
    assert not missing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_zoo_matches_parsicore(seed: int) -> None:
    model_file = zoo_model(seed)
    x = model_input(model_file, 5, seed)
    ours, stats = load(model_file, backend="numpy").run_with_stats(x)
    assert 0.0 < stats.macs_fraction < 1.0  # the gates really switch kernels off
    assert_outputs_close(ours, _ort_outputs(model_file, x))


@pytest.mark.parametrize("seed", [0, 3])
def test_small_cnn_matches_parsicore(seed: int) -> None:
    model_file = small_cnn(seed).build()
    x = model_input(model_file, 3, seed)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x)
    assert_outputs_close(ours, _ort_outputs(model_file, x))


@pytest.mark.parametrize("variant", sorted(GATED_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gated_models_match_parsicore(variant: str, seed: int) -> None:
    model_file = gated_cnn(seed=seed, **GATED_VARIANTS[variant])  # type: ignore[arg-type]
    x = model_input(model_file, 6, seed + 10)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x)
    assert_outputs_close(ours, _ort_outputs(model_file, x))


@pytest.mark.parametrize(("variant", "overrides"), [("lkam-hard-2banks", {"threshold": 0.8}),
                                                    ("lkam-scaled-1bank-3x3", {"threshold": 0.2}),
                                                    ("topk-scaled", {"keep": 0.25}),
                                                    ("topk-hard", {"keep": 0.9})])
def test_overrides_are_baked_in(variant: str, overrides: dict[str, float]) -> None:
    model_file = gated_cnn(seed=4, **GATED_VARIANTS[variant])  # type: ignore[arg-type]
    x = model_input(model_file, 4, 5)
    model = load(model_file, backend="numpy")
    ours, stats = model.run_with_stats(x, **overrides)  # type: ignore[arg-type]
    default, default_stats = model.run_with_stats(x)
    assert stats.macs_executed != default_stats.macs_executed  # the override changes what runs
    assert_outputs_close(ours, _ort_outputs(model_file, x, **overrides))


@pytest.mark.parametrize("variant", sorted(GATED_VARIANTS))
def test_import_of_export_round_trips_gated(variant: str) -> None:
    from parsicore.importers.onnx_import import import_onnx

    model_file = gated_cnn(seed=2, **GATED_VARIANTS[variant])  # type: ignore[arg-type]
    back = import_onnx(export_onnx(model_file), selftest=False)
    kinds = sorted(n.op for n in back.nodes if n.op in ("LKAMGate", "TopKGate", "ChannelMask"))
    assert kinds == sorted(n.op for n in model_file.nodes if n.op in ("LKAMGate", "TopKGate", "ChannelMask"))
    x = model_input(model_file, 6, 7)
    ours, stats = load(model_file, backend="numpy").run_with_stats(x)
    again, stats_again = load(back, backend="numpy").run_with_stats(x)
    assert len(load(back, backend="numpy").plan.gated_steps) == 2
    assert stats_again.macs_executed == stats.macs_executed
    assert_outputs_close(ours, {model_file.outputs[0]: next(iter(again.values()))})


def test_batch_dimension_stays_dynamic(tmp_path: object) -> None:
    model_file = gated_cnn(seed=0)
    path = tmp_path / "m.onnx"  # type: ignore[operator]
    export_onnx(model_file, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = model_input(model_file, n, n)
        out = session.run(None, {"x": x})[0]
        assert out.shape == (n, 4)


def test_bad_opset_is_one_line_error() -> None:
    with pytest.raises(ConversionError, match="opset 9"):
        export_onnx(small_cnn().build(), opset=9)


@pytest.mark.parametrize("opset", [14, 18])
def test_other_opsets(opset: int) -> None:
    model_file = gated_cnn(seed=1, gate_kernel=3, two_banks=False)
    x = model_input(model_file, 2, 0)
    ours, _ = load(model_file, backend="numpy").run_with_stats(x)
    proto = export_onnx(model_file, opset=opset)
    assert proto.opset_import[0].version == opset
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_outputs_close(ours, {"logits": session.run(None, {"x": x})[0]})

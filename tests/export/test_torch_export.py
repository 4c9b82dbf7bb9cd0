"""PyTorch exporter: architectures written in tests/_torch_archs.py, random weights, numpy backend.

Tolerance (issue 4): parsicore's outputs within 1e-4 of PyTorch's, relative to the output scale
max |torch output|; top-1 identical over 100 random inputs. Full-size (224x224) runs are kept to one image
each for ResNet-18 and MobileNetV2 because the numpy backend on this shared 2-core machine needs about a
second per image there; the 100-random-input top-1 comparisons run on the smaller nets (VGG-style 32x32,
the op zoo, the gated net) and on MobileNetV2 at 32x32; ResNet-18's top-1 check uses 8 inputs at 64x64.
Gated models are compared against PyTorch in eval mode, i.e. running the same hard-thresholded gates.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from parsicore.api import load  # noqa: E402
from parsicore.check import check_selftest  # noqa: E402
from parsicore.errors import ConversionError  # noqa: E402
from parsicore.export.torch_export import export_torch  # noqa: E402
from parsicore.format import NAME_RE, read_model  # noqa: E402
from tests import _torch_archs as archs  # noqa: E402

RTOL = 1e-4


def _torch_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _random(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _compare_many(module: torch.nn.Module, model: object, x: np.ndarray, batch: int = 25) -> tuple[float, float]:
    """(max rel error, top-1 agreement) of parsicore against PyTorch over the rows of x."""
    ours = np.concatenate([model(x[i:i + batch]) for i in range(0, len(x), batch)])  # type: ignore[operator]
    ref = _torch_out(module, x)
    return _rel_error(ours, ref), float((ours.argmax(1) == ref.argmax(1)).mean())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_full_size_224_within_tolerance(arch: str) -> None:
    module = archs.ARCHITECTURES[arch]()
    x = _random(1, (3, 224, 224))
    model_file = export_torch(module, x, selftest=False)
    model = load(model_file, backend="numpy")
    err = _rel_error(model(x), _torch_out(module, x))
    assert err <= RTOL, f"{arch}: max rel error {err:.3g}"


@pytest.fixture(scope="module")
def resnet64() -> tuple[torch.nn.Module, object]:
    module = archs.resnet18()
    return module, export_torch(module, _random(2, (3, 64, 64), seed=1), selftest=False)


def test_resnet18_top1_at_64(resnet64: tuple[torch.nn.Module, object]) -> None:
    """ResNet-18 at 64x64, 8 random inputs: tolerance and top-1 (the 100-input top-1 runs on smaller nets)."""
    module, model_file = resnet64
    err, top1 = _compare_many(module, load(model_file, backend="numpy"), _random(8, (3, 64, 64), seed=2), batch=8)
    assert err <= RTOL and top1 == 1.0


def test_names_are_qualified_and_valid(resnet64: tuple[torch.nn.Module, object]) -> None:
    names = [n.name for n in resnet64[1].nodes]  # type: ignore[attr-defined]
    assert all(NAME_RE.match(n) for n in names)
    assert "layer1.0.conv1" in names and "layer2.0.downsample.0" in names
    assert "layer1.0.relu#2" in names  # the block's ReLU module is called twice


@pytest.fixture(scope="module")
def gated() -> tuple[torch.nn.Module, object]:
    module = archs.gated_net()
    return module, export_torch(module, _random(2, (3, 16, 16)))


@pytest.mark.parametrize(("arch", "size"), [("mobilenet_v2", 32), ("vgg_small", 32), ("op_zoo", 32), ("gated", 16)])
def test_top1_identical_over_100_random_inputs(arch: str, size: int, gated: tuple[torch.nn.Module, object]) -> None:
    if arch == "gated":
        module, model_file = gated
    else:
        module = archs.ARCHITECTURES[arch]()
        model_file = export_torch(module, _random(2, (3, size, size), seed=3))
    err, top1 = _compare_many(module, load(model_file, backend="numpy"), _random(100, (3, size, size), seed=4))
    assert err <= RTOL, f"{arch}: max rel error {err:.3g}"
    assert top1 == 1.0


def test_gated_model_keeps_its_gates_and_skips_work(gated: tuple[torch.nn.Module, object]) -> None:
    """Both gate kinds in both modes become gate ops + ChannelMask; the planner links all four convs."""
    model_file = gated[1]
    ops = {n.name: n.op for n in model_file.nodes}  # type: ignore[attr-defined]
    assert [ops[g] for g in ("gate2", "gate3", "gate4", "gate5")] == ["LKAMGate", "LKAMGate", "TopKGate", "TopKGate"]
    assert sum(op == "ChannelMask" for op in ops.values()) == 4
    attrs = {n.name: dict(n.attrs) for n in model_file.nodes}  # type: ignore[attr-defined]
    assert attrs["gate2"]["mode"] == "hard" and attrs["gate3"]["mode"] == "scaled"
    assert attrs["gate3"]["kernel_size"] == 3 and attrs["gate3"]["pool"] == "max"
    assert attrs["gate4"]["scaled"] is True and attrs["gate5"]["scaled"] is False
    assert attrs["gate5"]["keep_ratio"] == 20 / 64  # ceil(0.3 * 64) kept, as PyTorch
    model = load(model_file, backend="numpy")
    assert [s.name for s in model.plan.gated_steps] == ["conv2", "conv3", "conv4", "conv5"]
    _, stats = model.run_with_stats(_random(8, (3, 16, 16), seed=5))
    assert 0.2 < stats.macs_fraction < 0.9


def test_gated_threshold_override_matches_torch(gated: tuple[torch.nn.Module, object]) -> None:
    """The exported threshold is a default: overriding it matches PyTorch with the same threshold."""
    module, model_file = gated
    x = _random(4, (3, 16, 16), seed=6)
    for g in (module.gate2, module.gate3):
        g.threshold = 0.7
    try:
        ref = _torch_out(module, x)
    finally:
        module.gate2.threshold, module.gate3.threshold = 0.5, 0.6
    assert _rel_error(load(model_file, backend="numpy")(x, threshold=0.7), ref) <= RTOL


def test_default_gated_architecture_exports() -> None:
    """The shipped default model's architecture (scripts/fashion_gated_arch.py), random weights."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "fashion_gated_arch.py"
    if not path.is_file():
        pytest.skip("scripts/fashion_gated_arch.py is not there")
    spec = importlib.util.spec_from_file_location("fashion_gated_arch", path)
    arch = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["fashion_gated_arch"] = arch
    spec.loader.exec_module(arch)  # type: ignore[union-attr]
    torch.manual_seed(0)
    module = archs.randomise_bn(arch.GatedNet(arch.ArchConfig()))
    archs.calibrate_lkam_gates(module, torch.randn(32, 1, 28, 28))
    x = _random(6, (1, 28, 28), seed=7)
    model_file = export_torch(module, x[:2])
    assert sum(n.op == "LKAMGate" for n in model_file.nodes) == len(module.gate_modules())
    model = load(model_file, backend="numpy")
    err, top1 = _compare_many(module, model, x)
    assert err <= RTOL and top1 == 1.0


def test_selftest_vector_and_checksum_embedded(tmp_path: Path) -> None:
    module = archs.vgg_small()
    x = _random(2, (3, 32, 32))
    target = tmp_path / "vgg.h5"
    export_torch(module, x, target, name="vgg", labels=[f"c{i}" for i in range(10)],
                 preprocessing={"input_size": (32, 32), "colour": "RGB"})
    mf = read_model(target)
    assert mf.metadata["name"] == "vgg" and mf.metadata["labels"][3] == "c3"
    assert mf.metadata["preprocessing"]["input_size"] == [32, 32]
    assert len(mf.metadata["weights_sha256"]) == 64
    (inp,) = mf.selftest_inputs.values()
    (out,) = mf.selftest_outputs.values()
    np.testing.assert_array_equal(inp, x)
    np.testing.assert_allclose(out, _torch_out(module, x), rtol=0, atol=0)
    report = check_selftest(load(target, backend="numpy"))
    assert report.passed and report.checksum_ok


class _Unsupported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.act = torch.nn.GELU()
        self.up = torch.nn.Upsample(scale_factor=2)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.act(self.conv(x)))
        x = torch.nn.functional.elu(x)
        x = x[:, :4]
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).repeat(1, 2))


def test_unsupported_modules_and_functions_all_listed() -> None:
    with pytest.raises(ConversionError) as info:
        export_torch(_Unsupported(), _random(1, (3, 8, 8)))
    msg = str(info.value)
    for what in ("conv (torch.nn.modules.conv.Conv2d): padding_mode='reflect'",
                 "act (torch.nn.modules.activation.GELU)", "up (torch.nn.modules.upsampling.Upsample)",
                 "elu (torch.nn.functional.elu)", "getitem (_operator.getitem)", "repeat (Tensor.repeat)"):
        assert what in msg, msg
    assert "\n" not in msg


class _DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_block_in_sequential_named() -> None:
    """fx cannot trace value-dependent control flow; the Sequential is walked and the block named."""
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), _DataDependent(), torch.nn.ReLU())
    with pytest.raises(ConversionError, match=r"1 \(tests\.export\.test_torch_export\._DataDependent\)"):
        export_torch(seq, _random(1, (3, 4, 4)))


def test_untraceable_module_reports_fx_error() -> None:
    with pytest.raises(ConversionError, match="torch.fx cannot trace _DataDependent"):
        export_torch(_DataDependent(), _random(1, (3, 4, 4)))


def test_verification_failure_names_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mismatch between parsicore and PyTorch raises, naming the first diverging layer."""
    from parsicore.export import torch_export

    monkeypatch.setattr(torch_export, "VERIFY_RTOL", 0.0)
    monkeypatch.setattr(torch_export, "VERIFY_ATOL", -1.0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with pytest.raises(ConversionError, match=r"first diverging layer 0 \(Conv\)"):
        export_torch(tiny, _random(1, (3, 4, 4)))


def test_module_training_flag_restored() -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    export_torch(module, _random(2, (3, 4, 4)))
    assert module.training

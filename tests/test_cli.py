"""The parsicore command: output of run/info/eval, and one line + exit code 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parsicore.api import weights_dir
from parsicore.cli import main
from tests.models import small_cnn

SAMPLES = sorted((weights_dir() / "samples").glob("*.png"))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "small.h5"
    small_cnn(0).save(path)
    return path


def test_samples_ship_with_labels_in_names():
    assert len(SAMPLES) == 10
    assert any("ankle-boot" in p.name for p in SAMPLES)


def test_version(capsys):
    from parsicore import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and __version__ in out


def test_run_text(capsys, model_path):
    code, out, err = run_cli(capsys, "run", str(SAMPLES[0]), "--model", str(model_path), "--backend", "numpy")
    assert code == 0, err
    assert str(SAMPLES[0]) in out and "latency" in out and "MACs executed" in out


def test_run_json_keys(capsys, model_path):
    code, out, _ = run_cli(capsys, "run", *map(str, SAMPLES[:3]), "--model", str(model_path), "--json",
                           "--top-k", "2", "--backend", "numpy")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 3
    for r in records:
        assert {"image", "top", "latency_ms", "macs_executed", "macs_dense"} <= set(r)
        assert len(r["top"]) == 2 and {"label", "index", "prob"} <= set(r["top"][0])
        assert r["top"][0]["prob"] >= r["top"][1]["prob"]


def test_run_directory(capsys, model_path):
    code, out, _ = run_cli(capsys, "run", str(SAMPLES[0].parent), "--model", str(model_path), "--json")
    assert code == 0 and len(out.splitlines()) == len(SAMPLES)


@pytest.mark.parametrize(("asked", "environ", "images", "expected"), [
    (None, {}, 1, "numpy"),
    (None, {}, 255, "numpy"),
    (None, {}, 256, None),
    ("numba", {}, 1, "numba"),
    ("reference", {}, 1000, "reference"),
    (None, {"PARSICORE_BACKEND": "numba"}, 1, None),
])
def test_run_backend_policy(asked, environ, images, expected):
    from parsicore.cli import RUN_NUMBA_MIN_IMAGES, run_backend

    assert RUN_NUMBA_MIN_IMAGES == 256
    assert run_backend(asked, images, environ) == expected


def test_run_reports_the_backend_it_used(capsys, model_path, monkeypatch):
    monkeypatch.delenv("PARSICORE_BACKEND", raising=False)
    _, out, _ = run_cli(capsys, "run", str(SAMPLES[0]), "--model", str(model_path), "--json")
    assert json.loads(out)["backend"] == "numpy"
    pytest.importorskip("numba")
    _, out, _ = run_cli(capsys, "run", str(SAMPLES[0]), "--model", str(model_path), "--json", "--backend", "numba")
    assert json.loads(out)["backend"] == "numba"
    monkeypatch.setenv("PARSICORE_BACKEND", "numba")
    _, out, _ = run_cli(capsys, "run", str(SAMPLES[0]), "--model", str(model_path), "--json")
    assert json.loads(out)["backend"] == "numba"


def test_run_loads_numba_kernels_before_the_first_timed_image(capsys, monkeypatch):
    """With the numba backend, run calls the model on other input for every gate setting (so every kernel, gated
    and dense, is compiled or loaded) before it times the image, and says so on stderr; numpy needs no warm-up."""
    pytest.importorskip("numba")
    import parsicore
    from parsicore.cli_warmup import GATE_SETTINGS
    from parsicore.image import check_preprocessing, load_image
    from parsicore.runtime import Model

    default = parsicore.load(None, backend="numpy")
    image = load_image(SAMPLES[0], check_preprocessing(default.metadata["preprocessing"]))
    calls: list[tuple[bool, float | None, float | None]] = []
    original = Model.run_with_stats

    def recording(self, x, threshold=None, keep=None, **kwargs):
        feed = next(iter(x.values())) if isinstance(x, dict) else x
        calls.append((not np.array_equal(feed, image), threshold, keep))
        return original(self, x, threshold=threshold, keep=keep, **kwargs)

    monkeypatch.setattr(Model, "run_with_stats", recording)
    code, out, err = run_cli(capsys, "run", str(SAMPLES[0]), "--json", "--backend", "numba")
    assert code == 0 and json.loads(out)["backend"] == "numba"
    assert calls == [(True, t, k) for t, k in GATE_SETTINGS] + [(False, None, None)]
    notices = [line for line in err.splitlines() if "numba kernels ready in" in line]
    assert len(notices) == 1 and notices[0].startswith("parsicore: notice:")
    calls.clear()
    code, _, err = run_cli(capsys, "run", str(SAMPLES[0]), "--json", "--backend", "numpy")
    assert code == 0 and calls == [(False, None, None)] and "kernels ready" not in err


def test_run_matches_api(capsys, model_path):
    import parsicore
    from parsicore.image import check_preprocessing, load_image
    from parsicore.postprocess import to_probabilities

    m = parsicore.load(model_path, backend="numpy")
    x = load_image(SAMPLES[1], check_preprocessing(m.metadata["preprocessing"]))
    probs = to_probabilities(m(x))[0]
    _, out, _ = run_cli(capsys, "run", str(SAMPLES[1]), "--model", str(model_path), "--json", "--backend", "numpy")
    top = json.loads(out)["top"][0]
    assert top["index"] == int(np.argmax(probs))
    assert abs(top["prob"] - probs.max()) < 1e-5


def _one_line_error(code: int, err: str, expected_code: int = 2) -> None:
    assert code == expected_code
    # An unrecognised machine adds a one-line board notice (e.g. emulated aarch64); it is not an error line.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("parsicore: notice:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("parsicore: error:")
    assert "Traceback" not in err


def test_missing_image(capsys, model_path, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.png"), "--model", str(model_path))
    _one_line_error(code, err)
    assert "nope.png" in err


def test_not_an_image(capsys, model_path, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text")
    code, _, err = run_cli(capsys, "run", str(bad), "--model", str(model_path))
    _one_line_error(code, err)


def test_truncated_image(capsys, model_path, tmp_path):
    data = (SAMPLES[0]).read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "run", str(bad), "--model", str(model_path))
    _one_line_error(code, err)


def test_decompression_bomb(capsys, model_path, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # tiny file, 144 M pixels declared
    assert bomb.stat().st_size < 100_000
    code, _, err = run_cli(capsys, "run", str(bomb), "--model", str(model_path))
    _one_line_error(code, err)
    assert "bomb" in err


@pytest.mark.parametrize("args", [["--threshold", "1.5"], ["--threshold", "-0.1"], ["--threshold", "abc"],
                                  ["--keep", "0"], ["--top-k", "0"], ["--backend", "cuda"], ["--threads", "0"],
                                  ["--no-such-option"]])
def test_bad_options(capsys, model_path, args):
    code, _, err = run_cli(capsys, "run", str(SAMPLES[0]), "--model", str(model_path), *args)
    _one_line_error(code, err)


def test_bad_model_file(capsys, tmp_path):
    bad = tmp_path / "m.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    code, _, err = run_cli(capsys, "run", str(SAMPLES[0]), "--model", str(bad))
    _one_line_error(code, err)
    code, _, err = run_cli(capsys, "info", str(tmp_path / "absent.h5"))
    _one_line_error(code, err)


def test_one_bad_image_among_many(capsys, model_path, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    code, out, err = run_cli(capsys, "run", str(SAMPLES[0]), str(bad), str(SAMPLES[1]), "--model", str(model_path),
                             "--json")
    assert code == 1
    assert len(out.splitlines()) == 2
    assert "bad.png" in err


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA", "I", "F"])
def test_any_image_mode_and_size(capsys, model_path, tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (37, 51, 3), dtype=np.uint8), "RGB")
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else base.convert("L").convert(mode)
    path = tmp_path / f"img.{'tiff' if mode in ('I;16', 'I', 'F', 'CMYK') else 'png'}"
    img.save(path)
    code, out, err = run_cli(capsys, "run", str(path), "--model", str(model_path), "--json")
    assert code == 0, err
    assert json.loads(out)["top"]


def test_gate_map_written(capsys, tmp_path):
    from parsicore.format import write_model
    from tests.models import gated_cnn

    model = tmp_path / "gated.h5"
    write_model(gated_cnn(0), model)
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(img)
    out_png = tmp_path / "map.png"
    code, _, err = run_cli(capsys, "run", str(img), "--model", str(model), "--gate-map", str(out_png))
    assert code == 0, err
    with Image.open(out_png) as m:
        assert m.size[0] > 10


def test_info_table(capsys, model_path):
    code, out, _ = run_cli(capsys, "info", str(model_path), "--backend", "numpy")
    assert code == 0
    assert "conv1" in out and "Conv" in out and "(N, 8, 28, 28)" in out and "total:" in out
    assert "backend: numpy" in out


def test_eval_on_class_folders(capsys, model_path, tmp_path):
    data = tmp_path / "data"
    for sample in SAMPLES[:4]:
        label = {"ankle-boot": "Ankle boot", "pullover": "Pullover", "trouser": "Trouser", "shirt": "Shirt"}[
            sample.stem.split("_", 1)[1]]
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / sample.name).write_bytes(sample.read_bytes())
    code, out, err = run_cli(capsys, "eval", str(model_path), str(data), "--json", "--backend", "numpy")
    assert code == 0, err
    result = json.loads(out)
    assert result["points"][0]["images"] == 4


def test_console_script_subprocess(model_path):
    proc = subprocess.run([sys.executable, "-m", "parsicore", "run", str(SAMPLES[0]), "--model", str(model_path),
                           "--threshold", "7"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    _one_line_error(proc.returncode, proc.stderr)

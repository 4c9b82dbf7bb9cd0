"""``parsicore check``: self-test + checksum, --input/--expected, --onnx; exit 0 pass, 1 mismatch, 2 bad input.

The models are the small gated test net (16x16) exported through torch.onnx.export and converted, and a tiny
ModelBuilder model; every CLI run uses the numpy backend.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from parsicore.builder import ModelBuilder
from parsicore.check import compare_output, format_report, load_arrays
from parsicore.cli import main
from parsicore.errors import InputError
from parsicore.format import write_model


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


@pytest.fixture(autouse=True)
def numpy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARSICORE_BACKEND", "numpy")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model.h5 converted from gated.onnx, gated.onnx)."""
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")  # noqa: F841
    pytest.importorskip("onnxruntime")
    from parsicore.importers.onnx_import import save_onnx_as
    from tests._torch_archs import gated_net

    d = tmp_path_factory.mktemp("check")
    src = d / "gated.onnx"
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gated_net(), (x,), str(src), opset_version=13, dynamo=False, input_names=["x"],
                          output_names=["y"])
    target = d / "gated.h5"
    save_onnx_as(src, target)
    return target, src


def _tamper(src: Path, dst: Path, dataset: str, factor: float) -> Path:
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        d = f[dataset]
        d[...] = d[()] * factor
    return dst


def _conv_weight(model: Path, node_suffix: str) -> str:
    import h5py

    with h5py.File(model, "r") as f:
        return next(f"weights/{k}/weight" for k in f["weights"] if k.endswith(node_suffix))


# ----------------------------------------------------------------------------------------------- self-test


def test_selftest_and_checksum_pass(converted: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["check", str(converted[0])], capsys)
    assert code == 0, out
    assert "weights checksum: OK" in out and "top-1 agree 2/2" in out and out.rstrip().endswith("PASS")


def test_tampered_weights_detected(converted: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    model, _ = converted
    bad = _tamper(model, tmp_path / "bad.h5", _conv_weight(model, "conv2.Conv"), 1.05)
    code, out, _ = run_cli(["check", str(bad)], capsys)
    assert code == 1
    assert "weights checksum: MISMATCH" in out and out.rstrip().endswith("FAIL")


def test_tampered_selftest_vector_detected(converted: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    bad = _tamper(converted[0], tmp_path / "bad.h5", "selftest/output/y", 1.5)
    code, out, _ = run_cli(["check", str(bad)], capsys)
    assert code == 1
    assert "weights checksum: OK" in out and "output y:" in out and "FAIL" in out


def test_nothing_to_check_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    b = ModelBuilder("bare")
    b.add_input("x", (None, 4))
    b.add_node("Relu", ["x"], ["y"], name="relu")
    b.add_output("y")
    mf = b.build()
    del mf.metadata["weights_sha256"]
    write_model(mf, tmp_path / "bare.h5")
    code, _, err = run_cli(["check", str(tmp_path / "bare.h5")], capsys)
    assert code == 2 and "neither a self-test vector nor a weights checksum" in err


# ----------------------------------------------------------------------------------------------- --expected


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A two-layer model, an input and its exact output (computed here independently)."""
    rng = np.random.default_rng(3)
    w, bias = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    b = ModelBuilder("tiny")
    b.add_input("x", (None, 4))
    b.add_node("Gemm", ["x"], ["h"], name="fc", weights={"weight": w, "bias": bias})
    b.add_node("Relu", ["h"], ["y"], name="relu")
    b.add_output("y")
    b.save(tmp_path / "tiny.h5")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    return tmp_path / "tiny.h5", x, np.maximum(x @ w.T + bias, 0).astype(np.float32)


def test_expected_npy_pass_and_mismatch(tiny: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    model, x, y = tiny
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    code, out, _ = run_cli(["check", str(model), "--input", str(tmp_path / "x.npy"), "--expected",
                            str(tmp_path / "y.npy")], capsys)
    assert code == 0 and "max rel" in out and "PASS" in out
    np.save(tmp_path / "y_bad.npy", y + 0.01)
    code, out, _ = run_cli(["check", str(model), "--input", str(tmp_path / "x.npy"), "--expected",
                            str(tmp_path / "y_bad.npy")], capsys)
    assert code == 1 and out.rstrip().endswith("FAIL")
    code, out, _ = run_cli(["check", str(model), "--input", str(tmp_path / "x.npy"), "--expected",
                            str(tmp_path / "y_bad.npy"), "--atol", "0.02"], capsys)
    assert code == 0


def test_expected_npz_with_intermediates_names_layer(tiny: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """An .npz holding intermediate tensors by the model's names locates the first diverging layer."""
    model, x, y = tiny
    np.savez(tmp_path / "x.npz", x=x)
    np.savez(tmp_path / "y.npz", y=y + 1.0, h=np.full((3, 5), 9.0, np.float32))
    code, out, _ = run_cli(["check", str(model), "--input", str(tmp_path / "x.npz"), "--expected",
                            str(tmp_path / "y.npz")], capsys)
    assert code == 1 and "first diverging layer: fc (Gemm)" in out


@pytest.mark.parametrize("bad", ["shape", "pickle", "missing", "no_input", "nan"])
def test_bad_input_exits_2(bad: str, tiny: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    model, x, y = tiny
    np.save(tmp_path / "y.npy", y)
    xin = tmp_path / "x.npy"
    if bad == "shape":
        np.save(xin, x[:, :3])
    elif bad == "pickle":
        np.save(xin, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif bad == "nan":
        np.save(xin, np.full_like(x, np.nan))
    else:
        np.save(xin, x)
    args = ["check", str(model), "--input", str(xin if bad != "missing" else tmp_path / "none.npy"),
            "--expected", str(tmp_path / "y.npy")]
    if bad == "no_input":
        args = ["check", str(model), "--expected", str(tmp_path / "y.npy")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith("parsicore: error:") and err.count("\n") == 1


def test_load_arrays_refuses_pickle(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="without pickle"):
        load_arrays(tmp_path / "o.npy")


def test_compare_output_scale_and_top1() -> None:
    ref = np.array([[1.0, 4.0, -2.0], [0.5, 0.1, 0.2]], np.float32)
    got = ref + np.array([[0.0, 0.0, 0.004], [0.0, 0.5, 0.0]], np.float32)
    r = compare_output("y", got, ref, rtol=1e-4, atol=0.0)
    assert r.max_abs == pytest.approx(0.5) and r.max_rel == pytest.approx(0.5 / 4.0) and r.scale == 4.0
    assert r.top1 == (1, 2) and not r.passed


# ----------------------------------------------------------------------------------------------- --onnx


def test_onnx_pass(converted: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    model, src = converted
    code, out, _ = run_cli(["check", str(model), "--onnx", str(src)], capsys)
    assert code == 0, out
    assert "onnxruntime" in out and "random normal x (2, 3, 16, 16), seed 0" in out


def test_onnx_mismatch_names_diverging_layer(converted: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """A conversion bug in one conv (weights scaled) is located: that conv is the first diverging layer,
    even though it is gated (parsicore skips its switched-off channels, onnxruntime computes them)."""
    model, src = converted
    bad = _tamper(model, tmp_path / "bad.h5", _conv_weight(model, "conv4.Conv"), 1.05)
    code, out, _ = run_cli(["check", str(bad), "--onnx", str(src), "--seed", "2"], capsys)
    assert code == 1
    assert "first diverging layer: conv4.Conv (Conv)" in out, out


def test_onnx_with_given_input(converted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, src = converted
    np.save(tmp_path / "x.npy", np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32))
    code, out, _ = run_cli(["check", str(model), "--onnx", str(src), "--input", str(tmp_path / "x.npy")], capsys)
    assert code == 0 and "input: x (2, 3, 16, 16)" in out
    code, _, err = run_cli(["check", str(model), "--onnx", str(tmp_path / "missing.onnx")], capsys)
    assert code == 2 and "no such ONNX file" in err


def test_format_report_ends_with_verdict(converted: tuple[Path, Path]) -> None:
    from parsicore.api import load
    from parsicore.check import check_onnx

    model, src = converted
    lines = format_report(check_onnx(load(model, backend="numpy"), src))
    assert lines[-1] == "PASS" and lines[0].startswith("reference: onnxruntime")

"""``parsicore bench``: JSON keys, interleaved runs, peers missing -> skipped, bad options -> one line, exit 2.

Never timed assertions: only that latencies exist, are positive and are consistent with each other.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import pytest

from parsicore import bench
from parsicore.cli import main
from parsicore.errors import ParsicoreError
from tests.models import gated_cnn, small_cnn


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("bench") / "small.h5"
    small_cnn(0).save(path)
    return path


@pytest.fixture(scope="module")
def gated_path(tmp_path_factory: Any) -> Path:
    from parsicore.format import write_model

    path = tmp_path_factory.mktemp("bench") / "gated.h5"
    write_model(gated_cnn(seed=1, size=12), path)
    return path


@pytest.fixture
def no_peers(monkeypatch: Any) -> None:
    """onnxruntime and torch cannot be imported (as on a board without the optional extras)."""
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("onnxruntime", "torch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


ENGINE_KEYS = {"engine", "version", "median_ms", "p90_ms", "gflops", "macs_per_call", "load_ms", "latencies_ms",
               "output_rel_diff", "isolated_peak_rss_mb"}
TOP_KEYS = {"model", "input_shape", "threads", "runs", "warmup", "batch", "threshold", "keep", "backend", "order",
            "macs_dense", "macs_executed", "macs_fraction", "kernels_fraction", "engines", "ratios", "skipped",
            "peak_rss_mb"}


def test_json_keys_with_every_installed_peer(capsys: Any, model_path: Path) -> None:
    code, out, err = run_cli(capsys, "bench", str(model_path), "--runs", "3", "--warmup", "1", "--threads", "1",
                             "--backend", "numpy", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert TOP_KEYS <= set(report)
    assert report["runs"] == 3 and report["threads"] == 1 and report["order"] == "turns" and report["block"] == 4
    assert report["macs_fraction"] == 1.0 and report["kernels_fraction"] is None
    assert "parsicore" in report["engines"]
    for name, engine in report["engines"].items():
        assert ENGINE_KEYS <= set(engine), name
        assert len(engine["latencies_ms"]) == 3
        assert 0 < engine["median_ms"] <= engine["p90_ms"] <= max(engine["latencies_ms"])
        assert engine["gflops"] > 0
    ran = set(report["engines"]) - {"parsicore"}
    assert ran | set(report["skipped"]) == {"onnxruntime", "torch"}
    assert set(report["ratios"]) == ran
    for peer in ran:
        # The peers ran the same weights on the same input.
        assert report["engines"][peer]["output_rel_diff"] <= 1e-4
        ratio = report["engines"]["parsicore"]["median_ms"] / report["engines"][peer]["median_ms"]
        assert report["ratios"][peer] == pytest.approx(ratio, rel=1e-3)


def test_gated_model_reports_executed_fraction(capsys: Any, gated_path: Path) -> None:
    code, out, err = run_cli(capsys, "bench", str(gated_path), "--runs", "3", "--warmup", "0", "--backend", "numpy",
                             "--threads", "1", "--threshold", "0.6", "--batch", "2", "--json", "--compare", "none")
    assert code == 0, err
    report = json.loads(out)
    assert report["input_shape"] == [2, 3, 12, 12] and report["threshold"] == 0.6
    assert 0.0 < report["macs_fraction"] < 1.0 and 0.0 <= report["kernels_fraction"] < 1.0
    assert report["macs_executed"] < report["macs_dense"]
    assert set(report["engines"]) == {"parsicore"} and report["skipped"] == {}
    p = report["engines"]["parsicore"]
    assert p["macs_per_call"] == report["macs_executed"]


def test_missing_peers_are_skipped_not_errors(capsys: Any, model_path: Path, no_peers: None) -> None:
    code, out, err = run_cli(capsys, "bench", str(model_path), "--runs", "3", "--warmup", "0", "--backend", "numpy",
                             "--threads", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert set(report["engines"]) == {"parsicore"}
    assert set(report["skipped"]) == {"onnxruntime", "torch"}
    assert all("not installed" in reason for reason in report["skipped"].values())
    skip_lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(skip_lines) == 2  # one line per missing peer


def test_text_output(capsys: Any, model_path: Path, no_peers: None) -> None:
    code, out, err = run_cli(capsys, "bench", str(model_path), "--runs", "3", "--warmup", "0", "--backend", "numpy",
                             "--threads", "1", "--compare", "torch")
    assert code == 0, err
    assert "median ms" in out and "p90 ms" in out and "GFLOP/s" in out and "peak RSS" in out
    assert "skipped: torch" in out
    assert "bench" in err  # the progress bar goes to stderr


def test_isolated_peak_rss_per_engine(model_path: Path) -> None:
    cfg = bench.BenchConfig(threads=1, runs=2, warmup=0, backend="numpy", compare=("onnxruntime",), isolate=True)
    report = bench.run_benchmark(model_path, cfg)
    for e in report.engines:
        assert e.isolated_peak_rss_mb is not None and e.isolated_peak_rss_mb > 5
    assert report.engine("parsicore").isolated_peak_rss_mb < report.peak_rss_mb + 1  # type: ignore[union-attr]


def test_in_memory_model_and_library_api() -> None:
    cfg = bench.BenchConfig(threads=1, runs=2, warmup=0, backend="numpy", compare=())
    progress: list[int] = []
    report = bench.run_benchmark(small_cnn(1).build(), cfg, progress=progress.append)
    assert len(progress) == bench.total_calls(cfg, 1) == 4  # one turn of 4 calls, the first untimed, 2 kept
    assert len(report.engine("parsicore").latencies_ms) == 2  # type: ignore[union-attr]
    assert report.macs_dense == report.macs_executed > 0
    assert report.as_dict()["engines"]["parsicore"]["macs_per_call"] == report.macs_dense


@pytest.mark.parametrize("block, runs, warmup", [(4, 5, 1), (2, 3, 0), (1, 3, 2), (3, 1, 0)])
def test_engines_take_turns_and_the_first_call_of_a_turn_is_untimed(monkeypatch: pytest.MonkeyPatch, block: int,
                                                                     runs: int, warmup: int) -> None:
    """The call order is warm-up rounds (one call each), then turns of ``block`` calls per engine; the first call
    of each turn (it follows another engine's) is not timed, unless block is 1."""
    log: list[str] = []  # the engine of every call, in order
    prepare = bench._prepare_parsicore
    clock = [0.0]  # the benchmark's clock: a call that follows another engine's takes 1 s, any other 1 ms

    def logged(name: str, prepared: Any) -> Any:
        def call() -> Any:
            clock[0] += 1.0 if log and log[-1] != name else 0.001
            log.append(name)
            return prepared.call()
        return dataclasses.replace(prepared, name=name, call=call)

    def fake_prepare(model_file: Any, feeds: Any, cfg: Any) -> Any:
        prepared, state = prepare(model_file, feeds, cfg)
        return logged("parsicore", prepared), state

    def fake_peer(model_file: Any, feeds: Any, cfg: Any, macs: int, *rest: Any) -> Any:
        prepared, _ = prepare(model_file, feeds, cfg)
        return dataclasses.replace(logged("onnxruntime", prepared), version="fake")

    monkeypatch.setattr(bench, "_prepare_parsicore", fake_prepare)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "_prepare_onnxruntime", fake_peer)
    cfg = bench.BenchConfig(threads=1, runs=runs, warmup=warmup, backend="numpy", compare=("onnxruntime",),
                            block=block)
    report = bench.run_benchmark(small_cnn(1).build(), cfg)
    calls = log[2:]  # after the reference call of each engine (outputs compared)
    assert calls[: 2 * warmup] == ["parsicore", "onnxruntime"] * warmup
    turns = calls[2 * warmup:]
    assert len(turns) == bench.total_calls(cfg, 2) - 2 * warmup
    expected_turns = (["parsicore"] * block + ["onnxruntime"] * block) * bench.timed_turns(cfg)
    assert turns == expected_turns
    per_turn = block - 1 if block > 1 else 1
    assert bench.timed_turns(cfg) == -(-runs // per_turn)
    for e in report.engines:
        assert len(e.latencies_ms) == runs
        assert e.latencies_ms == pytest.approx([1000.0 if block == 1 else 1.0] * runs), e.engine


def test_bad_block_is_an_input_error() -> None:
    with pytest.raises(ParsicoreError, match="block"):
        bench.run_benchmark(small_cnn(1).build(), bench.BenchConfig(threads=1, runs=1, block=0, backend="numpy",
                                                                    compare=()))


@pytest.mark.parametrize("args", [
    ["--block", "0"],
    ["--runs", "0"],
    ["--warmup", "-1"],
    ["--threads", "0"],
    ["--batch", "0"],
    ["--threshold", "1.5"],
    ["--keep", "0"],
    ["--compare", "tensorflow"],
    ["--backend", "cuda"],
])
def test_bad_options_exit_2_one_line(capsys: Any, model_path: Path, args: list[str]) -> None:
    code, out, err = run_cli(capsys, "bench", str(model_path), *args)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("parsicore: error:"), err


def test_missing_model_exit_2_one_line(capsys: Any, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "bench", str(tmp_path / "absent.h5"), "--runs", "1")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("parsicore: error:") and "absent.h5" in lines[0]


def test_onnxruntime_threads_do_not_spin_between_calls(model_path: Path, tmp_path: Path) -> None:
    """Spinning pool threads would hold the cores during the next engine's call of the alternation."""
    pytest.importorskip("onnxruntime")
    from parsicore.format import read_model

    onnx_path = bench.export_for_onnxruntime(read_model(model_path), tmp_path / "m.onnx", bench.BenchConfig(threads=2))
    options = bench.ort_session(onnx_path, 2).get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert 'allow_spinning", "0"' in bench._CHILDREN["onnxruntime"]  # the isolated RSS child uses the same settings

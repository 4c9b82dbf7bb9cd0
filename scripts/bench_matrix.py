"""Run the whole benchmark matrix and write PERFORMANCE.md's measured sections, a JSON record and a PNG plot.

Every row is one ``parsicore bench MODEL --threads N --json --isolate`` in a fresh process (so the in-process
peak RSS of a row does not carry the previous rows' models): parsicore, ONNX Runtime and PyTorch on the
same weights, input and thread count, calls interleaved. Models (scripts/bench_models.py, random weights):
ResNet-18 and MobileNetV2 at 224x224, a VGG-style CNN at 32x32, the issue's small CNN at 28x28, the
synthetic-sparsity variants of ResNet-18 and MobileNetV2 (25/50/75 % of every gated layer's kernels off)
and the shipped default gated model (weights/fashion_gated.h5) when it exists. Then the start-up time of
``parsicore run SAMPLE`` (warm and empty Numba cache) and the peak RSS of ``parsicore run`` on ResNet-18.

Usage::

    python scripts/bench_matrix.py --write-doc                  # everything; rewrites PERFORMANCE.md's tables
    python scripts/bench_matrix.py --models resnet18,small_cnn --threads 1 --runs 10 --no-startup   # quick look

Model keys for --models: resnet18, mobilenet_v2, vgg_small, small_cnn, resnet18-gated (= -gated25, -gated50,
-gated75; each also alone), mobilenet_v2-gated, fashion_gated. The doc is only rewritten with --write-doc;
the generated part sits between the markers ``<!-- bench-matrix:begin -->`` and ``<!-- bench-matrix:end -->``,
everything outside them is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing parsicore
sys.path.insert(0, str(REPO / "scripts"))

import bench_models  # noqa: E402

from parsicore.bench import BenchConfig, command_peak_rss_mb  # noqa: E402

BEGIN = "<!-- bench-matrix:begin -->"
END = "<!-- bench-matrix:end -->"
DENSE_KEYS = tuple(bench_models.DENSE)
GATED_KEYS = tuple(f"{m}-gated{round(f * 100)}" for m in bench_models.GATED for f in bench_models.GATE_OFF_FRACTIONS)
DEFAULT_GATED = "fashion_gated"
ALL_KEYS = (*DENSE_KEYS, *GATED_KEYS, DEFAULT_GATED)
LABELS = {"resnet18": "ResNet-18 224", "mobilenet_v2": "MobileNetV2 224", "vgg_small": "VGG-style 32",
          "small_cnn": "small CNN 28", DEFAULT_GATED: "default gated model (fashion_gated.h5)"}


@dataclass
class Row:
    key: str
    threads: int
    report: dict[str, Any] | None  # the bench command's JSON; None when it failed
    error: str = ""
    load_before: float = 0.0
    load_after: float = 0.0
    code: str = ""  # engine_fingerprint() when the row started

    def engine(self, name: str) -> dict[str, Any] | None:
        return None if self.report is None else self.report["engines"].get(name)


# ----------------------------------------------------------------------------------------------- helpers


def _env(root: Path) -> dict[str, str]:
    """The environment of every measured process: parsicore imported from ``root`` (the snapshot)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


PARSICORE = [sys.executable, "-m", "parsicore"]  # with cwd and PYTHONPATH at the snapshot: its engine, not another


def snapshot(dest: Path) -> Path:
    """Copy the engine (parsicore/, weights/, boards/) of the working tree to ``dest``; every row runs that copy.

    Other developers edit the kernels while the matrix runs (an hour); without a snapshot, rows would run
    different engines and a row could even catch a half-written file.
    """
    for name in ("parsicore", "weights", "boards"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def expand_keys(text: str | None) -> list[str]:
    if not text:
        return list(ALL_KEYS)
    out: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.endswith("-gated") and part[: -len("-gated")] in bench_models.GATED:
            out += [k for k in GATED_KEYS if k.startswith(part)]
        elif part in ALL_KEYS:
            out.append(part)
        else:
            raise SystemExit(f"bench_matrix: unknown model {part!r} (choose from {', '.join(ALL_KEYS)}, "
                             f"resnet18-gated, mobilenet_v2-gated)")
    return list(dict.fromkeys(out))


def label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    base, _, off = key.partition("-gated")
    return f"{LABELS[base]}, synthetic {off} % off"


def default_model(root: Path) -> Path:
    """The shipped default gated model of the engine snapshot (not asked from parsicore: see main)."""
    return root / "weights" / "fashion_gated.h5"


def build_model(key: str, model_dir: Path) -> Path | None:
    """The model file for ``key`` (built into model_dir); None for the default gated model when absent."""
    if key == DEFAULT_GATED:
        path = default_model(model_dir.parent / "engine")
        return path if path.is_file() else None
    path = model_dir / f"{key}.h5"
    if not path.is_file():
        if key in bench_models.DENSE:
            bench_models.DENSE[key]().save(path)
        else:
            base, _, off = key.partition("-gated")
            bench_models.GATED[base](gate_off=int(off) / 100).save(path)
    return path


def run_row(root: Path, key: str, path: Path, threads: int, runs: int, warmup: int, isolate: bool) -> Row:
    cmd = [*PARSICORE, "bench", str(path), "--threads", str(threads), "--runs", str(runs), "--warmup",
           str(warmup), "--json"] + (["--isolate"] if isolate else [])
    before, code = os.getloadavg()[0], engine_fingerprint(root)
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(root), cwd=root, check=False)
    after = os.getloadavg()[0]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return Row(key, threads, None, f"exit {done.returncode}: {last}", before, after, code)
    return Row(key, threads, json.loads(done.stdout), "", before, after, code)


def quieter(a: Row, b: Row) -> Row:
    """Of two runs of the same row, the one the machine disturbed less (lower sum of engine medians)."""
    if a.report is None or b.report is None:
        return a if b.report is None else b

    def total(r: Row) -> float:
        return sum(e["median_ms"] for e in r.report["engines"].values())  # type: ignore[index]

    return a if total(a) <= total(b) else b


# ----------------------------------------------------------------------------------------------- machine


_MACHINE_SNIPPET = r"""
import json, os
from parsicore.boards import configure
settings = configure()
import numpy, numba
info = {"board": settings.board.name, "board_source": settings.board_source,
        "settings": [list(r) for r in settings.rows()], "numpy": numpy.__version__, "numba": numba.__version__}
try:
    info["numpy_config"] = {k: v for k, v in numpy.show_config(mode="dicts").get("Build Dependencies", {}).items()}
except Exception as e:
    info["numpy_config"] = str(e)
try:
    import threadpoolctl
    info["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "version", "architecture",
                                                      "num_threads", "threading_layer")}
                           for p in threadpoolctl.threadpool_info()]
except ImportError:
    info["threadpools"] = None
for mod in ("onnxruntime", "torch"):
    try:
        info[mod] = __import__(mod).__version__
    except ImportError:
        info[mod] = None
info["env"] = {k: os.environ[k] for k in sorted(os.environ)
               if k.startswith(("OPENBLAS", "OMP_", "MKL_", "NUMBA_", "PARSICORE_"))}
print(json.dumps(info))
"""


def code_version() -> str:
    """The commit the figures belong to, and whether the engine's files differed from it (others edit them)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "parsicore").splitlines()]
    return f"commit {head}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def engine_fingerprint(root: Path) -> str:
    """A short hash of every parsicore/*.py source under root: tells whether the engine changed between rows."""
    digest = hashlib.sha256()
    for path in sorted((root / "parsicore").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:8]


def machine_info(root: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = {}
    for line in lscpu.splitlines():
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    info["cpu"] = fields.get("Model name", platform.processor() or "?")
    info["cpus"] = fields.get("CPU(s)", str(os.cpu_count()))
    info["cores_per_socket"] = fields.get("Core(s) per socket", "?")
    info["threads_per_core"] = fields.get("Thread(s) per core", "?")
    info["hypervisor"] = fields.get("Hypervisor vendor", "")
    flags = fields.get("Flags", "").split()
    info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "asimd", "sve") if f in flags)
    done = subprocess.run([sys.executable, "-c", _MACHINE_SNIPPET], capture_output=True, text=True, env=_env(root),
                          cwd=root, check=False)
    if done.returncode == 0:
        info.update(json.loads(done.stdout))
    else:
        info["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
    return info


# ----------------------------------------------------------------------------------------------- start-up, memory


#: ``parsicore run`` takes the numpy backend for a few images unless told otherwise; these rows force the JIT.
NUMBA = ("--backend", "numba")


def sample_image() -> Path:
    return sorted((REPO / "weights" / "samples").glob("*.png"))[0]


def measure_startup(root: Path, model: Path | None, runs: int, cold_runs: int,
                    extra: Sequence[str] = ()) -> dict[str, Any]:
    """Wall time of ``parsicore run SAMPLE [--model M] [extra]``: warm Numba cache (median of runs after one
    untimed run) and empty cache (each run with a fresh NUMBA_CACHE_DIR)."""
    cmd = [*PARSICORE, "run", str(sample_image())] + (["--model", str(model)] if model else []) + list(extra)

    def timed(env: dict[str, str]) -> float:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["?"])[-1])
        return elapsed

    env = _env(root)
    result: dict[str, Any] = {"command": _shown(cmd, root), "model": str(model) if model else "default"}
    try:
        timed(env)  # fills the cache
        warm = [timed(env) for _ in range(runs)]
        cold = []
        for _ in range(cold_runs):
            with tempfile.TemporaryDirectory(prefix="parsicore-cold-cache-") as cache:
                cold.append(timed({**env, "NUMBA_CACHE_DIR": cache}))
    except RuntimeError as e:
        result["error"] = str(e)
        return result
    result.update(warm_median_s=statistics.median(warm), warm_min_s=min(warm), warm_runs=runs,
                  cold_median_s=statistics.median(cold), cold_min_s=min(cold), cold_runs=cold_runs,
                  load_avg=os.getloadavg()[0])
    return result


def _shown(cmd: Sequence[str], root: Path) -> str:
    """A command as a reader would type it: ``python`` for this interpreter, paths relative to the repo."""
    parts = []
    for c in cmd:
        if c == sys.executable:
            c = "python"
        elif c.startswith(str(REPO) + os.sep):
            c = os.path.relpath(c, REPO)
        elif c.startswith(str(root) + os.sep):
            c = os.path.relpath(c, root)
        elif c.endswith(os.sep + "parsicore"):
            c = "parsicore"
        parts.append(c)
    return " ".join(parts)


def measure_run_rss(root: Path, model: Path, extra: Sequence[str] = ()) -> float | None:
    """Peak RSS (MiB) of ``parsicore run --model MODEL SAMPLE [extra]`` (a process of its own)."""
    cmd = [*PARSICORE, "run", str(sample_image()), "--model", str(model), *extra]
    return command_peak_rss_mb(cmd, env=_env(root), cwd=root)


# ----------------------------------------------------------------------------------------------- skip curves

#: One process: the dense model and its gated variants loaded together and called in turn (dense, 25 % off,
#: 50 % off, 75 % off, dense, ...; each by parsicore then by ONNX Runtime on its export), so "gated / own
#: dense" compares calls made under the same machine load. Same input rule and BLAS limit as ``parsicore bench``.
_SKIP_SNIPPET = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
import parsicore
from parsicore.bench import (BenchConfig, PeerUnavailable, blas_limited, export_for_onnxruntime, ort_session,
                             random_feeds)
job = json.loads(sys.argv[1])
threads = job["threads"]
models = [(name, parsicore.load(path, threads=threads)) for name, path in job["models"]]
feeds = random_feeds(models[0][1].model_file, 1)
calls, out = [], {}
tmp = tempfile.mkdtemp(prefix="parsicore-skip-")
with blas_limited(threads):
    for name, m in models:
        _, stats = m.run_with_stats(feeds)
        out[name] = {"macs_executed": stats.macs_executed, "macs_dense": stats.macs_dense,
                     "kernels_fraction": stats.kernels_on / stats.kernels_total if stats.kernels_total else None}
        calls.append((name, "parsicore", lambda m=m: m.run_with_stats(feeds)))
        try:  # ONNX Runtime on the same network (gates dense), interleaved too
            onnx = export_for_onnxruntime(m.model_file, Path(tmp) / f"{name}.onnx", BenchConfig(threads=threads))
            session = ort_session(onnx, threads)
            calls.append((name, "onnxruntime", lambda s=session: s.run(None, feeds)))
        except PeerUnavailable:
            pass
    times = {(name, engine): [] for name, engine, _ in calls}
    for _ in range(job["warmup"]):
        for _, _, call in calls:
            call()
    block = job["block"]  # as parsicore bench: turns of `block` calls, the first of each untimed
    while any(len(v) < job["runs"] for v in times.values()):
        for name, engine, call in calls:
            for j in range(block):
                t0 = time.perf_counter()
                call()
                if (j > 0 or block == 1) and len(times[(name, engine)]) < job["runs"]:
                    times[(name, engine)].append((time.perf_counter() - t0) * 1000)
for (name, engine), values in times.items():
    key = "" if engine == "parsicore" else "ort_"
    out[name][key + "median_ms"] = float(np.median(values))
    out[name][key + "p90_ms"] = float(np.percentile(values, 90))
print(json.dumps(out))
"""


def skip_curve(root: Path, models: list[tuple[str, Path]], threads: int, runs: int, warmup: int) -> dict[str, Any]:
    """parsicore alone on a dense model and its gated variants, interleaved: {name: medians, MACs...}."""
    job = {"models": [(name, str(path)) for name, path in models], "threads": threads, "runs": runs,
           "warmup": warmup, "block": BenchConfig(threads=threads).block}
    cmd = [sys.executable, "-c", _SKIP_SNIPPET, json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(root), cwd=root, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout)


def skip_table(curves: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: per (model, threads) the dense median and each variant's median / dense, with MAC fractions."""
    offs = [round(f * 100) for f in bench_models.GATE_OFF_FRACTIONS]
    head = ["model", "threads", "dense median ms", *(f"{o} % off: median ms (x dense; MACs x dense)" for o in offs),
            "ORT median ms, dense / 50 % off (gates dense)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, curve in curves.items():
        base, threads = key.rsplit("@", 1)
        if "error" in curve:
            out.append(f"| {LABELS[base]} | {threads} | failed: {curve['error']} |" + " - |" * (len(offs) + 1))
            continue
        d = curve[base]
        cells = [LABELS[base], threads, _ms(d["median_ms"])]
        for o in offs:
            g = curve.get(f"{base}-gated{o}")
            cells.append("-" if g is None else f"{_ms(g['median_ms'])} ({g['median_ms'] / d['median_ms']:.2f}x; "
                         f"{g['macs_executed'] / d['macs_executed']:.2f}x)")
        half = curve.get(f"{base}-gated50", {})
        cells.append(f"{_ms(d.get('ort_median_ms'))} / {_ms(half.get('ort_median_ms'))}")
        out.append("| " + " | ".join(cells) + " |")
    return out


# ----------------------------------------------------------------------------------------------- output


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(rows: Sequence[Row]) -> list[str]:
    """The matrix as Markdown: one line per (model, threads)."""
    head = ["model", "threads", "parsicore median / p90 ms", "ORT median ms", "torch median ms", "parsicore/ORT",
            "parsicore/torch", "GFLOP/s parsicore / ORT", "MACs executed", "kernels on",
            "peak RSS MiB alone: parsicore / ORT / torch", "load avg"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    letters = code_letters(rows)
    for r in rows:
        if r.report is None:
            out.append(f"| {label(r.key)} | {r.threads} | failed: {r.error} |" + " - |" * (len(head) - 3))
            continue
        p, o, t = r.engine("parsicore"), r.engine("onnxruntime"), r.engine("torch")
        assert p is not None  # noqa: S101 - a bench report always holds parsicore
        ratios = r.report["ratios"]
        kf = r.report["kernels_fraction"]
        rss = " / ".join(_mb(e["isolated_peak_rss_mb"]) if e else "-" for e in (p, o, t))
        cells = [
            label(r.key), f"{r.threads}{letters.get(r.code, '')}", f"{_ms(p['median_ms'])} / {_ms(p['p90_ms'])}",
            _ms(o["median_ms"]) if o else "skipped", _ms(t["median_ms"]) if t else "skipped",
            _x(ratios.get("onnxruntime")), _x(ratios.get("torch")),
            f"{p['gflops']:.1f} / {o['gflops']:.1f}" if o else f"{p['gflops']:.1f} / -",
            f"{r.report['macs_fraction']:.1%}", "-" if kf is None else f"{kf:.0%}", rss,
            f"{r.load_before:.1f} - {r.load_after:.1f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def code_letters(rows: Sequence[Row]) -> dict[str, str]:
    """Engine fingerprint -> " (a)", " (b)"... when the engine's source changed during the run, else {}."""
    codes = list(dict.fromkeys(r.code for r in rows))
    return {} if len(codes) < 2 else {c: f" ({chr(ord('a') + i)})" for i, c in enumerate(codes)}


def _find(rows: Sequence[Row], key: str, threads: int) -> Row | None:
    return next((r for r in rows if r.key == key and r.threads == threads and r.report is not None), None)


def _median(row: Row | None, engine: str) -> float | None:
    e = row.engine(engine) if row else None
    return None if e is None else float(e["median_ms"])


def targets(rows: Sequence[Row], threads: Sequence[int], startup: dict[str, Any] | None,
            run_rss: float | None, curves: dict[str, dict[str, Any]] | None = None,
            startup_numba: dict[str, Any] | None = None,
            run_rss_numba: float | None = None) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target of the issue; verdict: met / NOT met / not measured."""
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    for key, limit in (("resnet18", 1.15), ("mobilenet_v2", 1.15), ("small_cnn", 1.5)):
        for t in threads:
            row = _find(rows, key, t)
            ratio = row.report["ratios"].get("onnxruntime") if row else None  # type: ignore[index]
            measured = "-" if ratio is None else (f"{ratio:.2f}x ({_median(row, 'parsicore'):.2f} vs "
                                                  f"{_median(row, 'onnxruntime'):.2f} ms)")
            out.append((f"dense {label(key)}, {t} thread(s): parsicore <= {limit}x ORT", measured,
                        verdict(None if ratio is None else ratio <= limit)))
    for key in bench_models.GATED:
        for t in threads:
            curve = (curves or {}).get(f"{key}@{t}", {})
            if key in curve and f"{key}-gated50" in curve:
                d, g = curve[key], curve[f"{key}-gated50"]
                out.append((f"{label(key)} 50 % off, {t} thread(s): <= 0.55x own dense",
                            f"{g['median_ms'] / d['median_ms']:.2f}x ({g['median_ms']:.2f} vs {d['median_ms']:.2f} ms "
                            f"in one interleaved run; MACs {g['macs_executed'] / d['macs_executed']:.1%} of the dense "
                            "model's)", verdict(g["median_ms"] / d["median_ms"] <= 0.55)))
                continue
            dense, gated = _find(rows, key, t), _find(rows, f"{key}-gated50", t)
            d, g = _median(dense, "parsicore"), _median(gated, "parsicore")
            if d is None or g is None:
                out.append((f"{label(key)} 50 % off, {t} thread(s): <= 0.55x own dense", "-", verdict(None)))
                continue
            frac = gated.report["macs_fraction"] * gated.report["macs_dense"] / dense.report["macs_dense"]  # type: ignore[union-attr]
            mixed = "; CAUTION: the two rows ran different engine sources" if dense.code != gated.code else ""  # type: ignore[union-attr]
            out.append((f"{label(key)} 50 % off, {t} thread(s): <= 0.55x own dense",
                        f"{g / d:.2f}x ({g:.2f} vs {d:.2f} ms; MACs {frac:.1%} of the dense model's{mixed})",
                        verdict(g / d <= 0.55)))
    for t in threads:
        row = _find(rows, DEFAULT_GATED, t)
        p, o = _median(row, "parsicore"), _median(row, "onnxruntime")
        measured = "-" if p is None or o is None else f"{p / o:.2f}x ({p:.3f} vs {o:.3f} ms)"
        out.append((f"default gated model, {t} thread(s): faster than ORT running it densely", measured,
                    verdict(None if p is None or o is None else p < o)))
    if startup and "warm_median_s" in startup:
        jit = ""
        if startup_numba and "warm_median_s" in startup_numba:
            jit = (f"; with `--backend numba`: {startup_numba['warm_median_s']:.2f} s warm, "
                   f"{startup_numba['cold_median_s']:.2f} s with an empty cache")
        out.append(("start-up `parsicore run SAMPLE` <= 1.0 s wall, warm JIT cache",
                    f"{startup['warm_median_s']:.2f} s median (one image: numpy backend, no JIT{jit})",
                    verdict(startup["warm_median_s"] <= 1.0)))
    else:
        why = startup.get("error", "-") if startup else "-"
        out.append(("start-up `parsicore run SAMPLE` <= 1.0 s wall, warm JIT cache", why, verdict(None)))
    ort_rss = None
    for t in threads:
        row = _find(rows, "resnet18", t)
        if row and row.engine("onnxruntime") and row.engine("onnxruntime")["isolated_peak_rss_mb"]:  # type: ignore[index]
            ort_rss = row.engine("onnxruntime")["isolated_peak_rss_mb"]  # type: ignore[index]
            break
    measured = "-" if run_rss is None or ort_rss is None else f"{run_rss:.0f} MiB vs ORT {ort_rss:.0f} MiB"
    if run_rss_numba is not None and measured != "-":
        measured += f" (with `--backend numba`: {run_rss_numba:.0f} MiB)"
    out.append(("peak RSS of `parsicore run` on ResNet-18 <= ORT's", measured,
                verdict(None if run_rss is None or ort_rss is None else run_rss <= ort_rss)))
    return out


def machine_lines(info: dict[str, Any]) -> list[str]:
    vm = f", VM: {info['hypervisor']}" if info.get("hypervisor") else ""
    lines = [f"- CPU: {info.get('cpu')} ({info.get('cpus')} CPUs, {info.get('cores_per_socket')} cores per socket, "
             f"{info.get('threads_per_core')} thread(s) per core{vm}); SIMD: {info.get('simd') or '-'}; "
             f"{info.get('machine')}",
             f"- Python {info.get('python')}, numpy {info.get('numpy')}, numba {info.get('numba')}, onnxruntime "
             f"{info.get('onnxruntime')}, torch {info.get('torch')}"]
    pools = info.get("threadpools") or []
    for p in pools:
        lines.append(f"- thread pool (threadpoolctl, after the board settings; `parsicore bench` limits BLAS to "
                     f"the row's thread count): {p.get('user_api')} "
                     f"{p.get('internal_api')} {p.get('version')}, kernels {p.get('architecture')}, "
                     f"{p.get('num_threads')} thread(s)"
                     + (f", {p['threading_layer']}" if p.get("threading_layer") else ""))
    cfg = info.get("numpy_config")
    if isinstance(cfg, dict) and "blas" in cfg:
        blas = cfg["blas"]
        lines.append(f"- numpy.show_config() BLAS: {blas.get('name')} {blas.get('version')} "
                     f"({blas.get('openblas configuration', '').strip() or blas.get('found', '')})")
    lines.append(f"- OPENBLAS_CORETYPE: {os.environ.get('OPENBLAS_CORETYPE', 'not set in the shell')}; "
                 f"board profile {info.get('board')} ({info.get('board_source')}); settings: "
                 + "; ".join(f"{n} = {v} ({s})" for n, v, s in info.get("settings", [])))
    return lines


def plot(rows: Sequence[Row], curves: dict[str, dict[str, Any]], path: Path) -> str:
    """Latency against the fraction of kernels on (gated variants, dense = 100 %); returns a note.

    Points come from the interleaved skip curves when measured (else from the table's rows, measured at other
    times); ONNX Runtime runs each network with its gates computed densely.
    """
    series = []
    for key in bench_models.GATED:
        for t in sorted({r.threads for r in rows} | {int(k.rsplit("@", 1)[1]) for k in curves}):
            curve = curves.get(f"{key}@{t}", {})
            curve = {} if "error" in curve else curve
            dense_row = _find(rows, key, t)
            dense_macs = curve[key]["macs_executed"] if key in curve else (
                dense_row.report["macs_dense"] if dense_row else None)  # type: ignore[index]
            points = []
            for name in (key, *(f"{key}-gated{round(off * 100)}" for off in bench_models.GATE_OFF_FRACTIONS)):
                row = _find(rows, name, t)
                ort = _median(row, "onnxruntime")
                if name in curve:
                    c = curve[name]
                    on, ours, macs = c["kernels_fraction"] or 1.0, c["median_ms"], c["macs_executed"]
                    ort = c.get("ort_median_ms")
                elif row is not None:
                    rep = row.report
                    on = rep["kernels_fraction"] or 1.0  # type: ignore[index]
                    ours = _median(row, "parsicore")
                    macs = rep["macs_executed"]  # type: ignore[index]
                else:
                    continue
                frac = macs / dense_macs if dense_macs else None
                points.append((on, ours, ort, frac))
            if len(points) > 1:
                series.append((key, t, sorted(points)))
    if not series:
        return "no gated rows: no plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from parsicore import drawing

        key, t, pts = series[0]
        drawing.curve([(x, y, f"{y:.0f} ms") for x, y, _, _ in pts], path,
                      title=f"{label(key)}, {t} thread(s): parsicore latency", xlabel="fraction of kernels on",
                      ylabel="median ms")
        return "matplotlib not installed: the plot shows the first series only"
    models = list(dict.fromkeys(k for k, _, _ in series))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, key in zip(axes[0], models):
        for _, t, pts in (s for s in series if s[0] == key):
            xs = [p[0] for p in pts]
            line, = ax.plot(xs, [p[1] for p in pts], "o-", label=f"parsicore, {t} thread(s)")
            ort = [(p[0], p[2]) for p in pts if p[2] is not None]
            if ort:
                ax.plot([p[0] for p in ort], [p[1] for p in ort], "s--", color=line.get_color(), alpha=0.6,
                        label=f"ONNX Runtime (gates computed densely), {t} thread(s)")
            dense = next((p for p in pts if p[0] == 1.0 and p[3] is not None and abs(p[3] - 1.0) < 1e-9), None)
            if dense and all(p[3] is not None for p in pts):
                ax.plot(xs, [dense[1] * p[3] for p in pts], ":", color=line.get_color(), alpha=0.8,
                        label=f"parsicore dense x MAC fraction, {t} thread(s)")
        ax.set_title(f"{label(key)}: synthetic sparsity")
        ax.set_xlabel("fraction of kernels on in every gated layer (1.0 = dense model)")
        ax.set_ylabel("median latency, ms (batch 1)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return ""


def write_doc(doc: Path, generated: list[str]) -> None:
    """Replace the text between the markers (or append the section when the markers are absent)."""
    text = doc.read_text() if doc.is_file() else "# Performance\n\n"
    block = "\n".join([BEGIN, *generated, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


# ----------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated model keys (default: all)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per engine and row (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds per row (default 3)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each row this many times and keep the least disturbed one (default 1)")
    ap.add_argument("--no-isolate", action="store_true", help="skip the per-engine peak RSS subprocesses")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up and `parsicore run` RSS figures")
    ap.add_argument("--write-doc", action="store_true", help="rewrite the generated section of --doc")
    ap.add_argument("--doc", type=Path, default=REPO / "PERFORMANCE.md")
    ap.add_argument("--plot", type=Path, default=REPO / "PERFORMANCE-latency.png")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="raw results (default with --write-doc: PERFORMANCE.json beside the doc)")
    args = ap.parse_args(argv)
    keys = expand_keys(args.models)
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.runs < 1 or args.warmup < 0 or args.repeat < 1 or not thread_counts or min(thread_counts) < 1:
        raise SystemExit("bench_matrix: --runs, --repeat and --threads must be >= 1, --warmup >= 0")
    command = "python scripts/bench_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    work = Path(tempfile.mkdtemp(prefix="parsicore-bench-matrix-"))
    version = code_version()
    root = snapshot(work / "engine")
    info = machine_info(root)
    notes: list[str] = []
    rows: list[Row] = []
    json_out = args.json_out or (args.doc.with_suffix(".json") if args.write_doc else None)
    startup = run_rss = startup_numba = run_rss_numba = None
    curves: dict[str, dict[str, Any]] = {}

    def record() -> dict[str, Any]:
        return {"command": command, "code": version, "started": started, "machine": info,
                "rows": [{"key": r.key, "threads": r.threads, "error": r.error, "load": [r.load_before, r.load_after],
                          "engine_sources": r.code, "report": r.report} for r in rows],
                "skip_curves": curves, "startup": startup, "parsicore_run_rss_mb": run_rss,
                "startup_backend_numba": startup_numba, "parsicore_run_rss_mb_backend_numba": run_rss_numba,
                "notes": notes}

    try:
        model_dir = work / "models"
        model_dir.mkdir()
        # Every model is built before the first row: the engine's sources may change while the matrix runs
        # (other developers), and this process must not import parsicore again after the start.
        paths = {key: build_model(key, model_dir) for key in keys}
        need_small = not args.no_startup and not default_model(root).is_file()
        startup_model = build_model("small_cnn", model_dir) if need_small else None
        rss_model = build_model("resnet18", model_dir) if not args.no_startup and "resnet18" in keys else None
        for key in keys:
            path = paths[key]
            if path is None:
                notes.append(f"{label(key)}: skipped, the file does not exist yet")
                print(f"bench_matrix: {key}: skipped (no model file)", file=sys.stderr)
                continue
            for t in thread_counts:
                best: Row | None = None
                for _ in range(args.repeat):
                    row = run_row(root, key, path, t, args.runs, args.warmup, not args.no_isolate)
                    best = row if best is None else quieter(best, row)
                assert best is not None  # noqa: S101 - repeat >= 1
                rows.append(best)
                print(table([best])[-1], file=sys.stderr)
                if json_out:  # partial results survive a crash or an interrupt
                    json_out.write_text(json.dumps(record(), indent=1))
        for base in bench_models.GATED:
            variants = [k for k in (base, *(f"{base}-gated{round(f * 100)}" for f in bench_models.GATE_OFF_FRACTIONS))
                        if k in keys]
            if base in keys and len(variants) > 1:
                for t in thread_counts:
                    curves[f"{base}@{t}"] = skip_curve(root, [(k, paths[k]) for k in variants], t, args.runs,  # type: ignore[misc]
                                                       args.warmup)
                    print(f"bench_matrix: skip curve {base}, {t} thread(s) done", file=sys.stderr)
        if not args.no_startup:
            if startup_model is not None:
                notes.append("start-up: the default model does not exist yet, so `parsicore run` used the small "
                             "CNN (28x28 grey, like the default) through --model")
            startup = measure_startup(root, startup_model, runs=10, cold_runs=3)
            startup_numba = measure_startup(root, startup_model, runs=10, cold_runs=3, extra=NUMBA)
            if rss_model is not None:
                run_rss = measure_run_rss(root, rss_model)
                run_rss_numba = measure_run_rss(root, rss_model, extra=NUMBA)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot_note = plot(rows, curves, args.plot)
    finished = time.strftime("%Y-%m-%d %H:%M %Z")
    generated = [
        "",
        f"Generated by `{command.strip()}` ({started} to {finished}). Engine: a snapshot of the working tree taken "
        f"at the start (parsicore {version}; sources {rows[0].code if rows else '-'}"
        "), so every row ran the same code while the kernels were being edited.",
        "",
        "Machine:",
        "",
        *machine_lines(info),
        f"- load average while the matrix ran: {min(r.load_before for r in rows) if rows else 0:.1f} to "
        f"{max(r.load_after for r in rows) if rows else 0:.1f} on {info.get('cpus')} CPUs (other jobs share this "
        "machine: absolute figures are slower than on a quiet one; the engines' alternating turns keep the ratios "
        "fair)",
        "",
        "### Results",
        "",
        f"Batch 1, median of the timed calls; the three engines take turns of {BenchConfig(threads=1).block} calls, "
        "the first of each turn untimed (`parsicore bench --block`). \"synthetic X % off\": "
        "ResNet-18/MobileNetV2 with LKAM gates forced to switch X % of every gated layer's kernels off "
        "(scripts/bench_models.py), a measuring device for skip efficiency, not a trained model; ORT and torch "
        "run those gates densely. MACs executed: parsicore's, as a fraction of the (gated) model's dense MACs. "
        "Peak RSS: each engine alone in a fresh process (`parsicore bench --isolate`).",
        "",
        *table(rows),
        "",
        *([
            "### Skip efficiency",
            "",
            "The dense model and its synthetic-sparsity variants loaded in one process and called in turns (as "
            "above), each by parsicore then by ONNX Runtime (so every column saw the same machine load): "
            "parsicore's median ms, then "
            "the ratio to the dense model's latency and the ratio of the MACs executed (gate overhead included); "
            "perfect skipping would make the two ratios equal. These runs decide the gated targets and draw the plot.",
            "",
            *skip_table(curves),
            "",
        ] if curves else []),
        "### Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in targets(rows, thread_counts, startup, run_rss, curves,
                                                             startup_numba, run_rss_numba)),
        "",
    ]
    if startup and "warm_median_s" in startup:
        generated += [f"Start-up: `{startup['command']}` wall time, median of {startup['warm_runs']} runs with a "
                      f"warm Numba cache {startup['warm_median_s']:.2f} s (min {startup['warm_min_s']:.2f} s); "
                      f"with an empty cache (fresh NUMBA_CACHE_DIR) median of {startup['cold_runs']} runs "
                      f"{startup['cold_median_s']:.2f} s (min {startup['cold_min_s']:.2f} s); load average "
                      f"{startup['load_avg']:.1f}.", ""]
    if startup_numba and "warm_median_s" in startup_numba:
        generated += [f"The same with the JIT path, `{startup_numba['command']}`: warm cache median "
                      f"{startup_numba['warm_median_s']:.2f} s (min {startup_numba['warm_min_s']:.2f} s), empty "
                      f"cache median {startup_numba['cold_median_s']:.2f} s (min {startup_numba['cold_min_s']:.2f} "
                      f"s).", ""]
    if run_rss is not None:
        numba_rss = "" if run_rss_numba is None else f"; with `--backend numba` {run_rss_numba:.0f} MiB"
        generated += [f"Memory: `parsicore run --model resnet18.h5 SAMPLE` peak RSS {run_rss:.0f} MiB{numba_rss}.",
                      ""]
    diffs = [(e["output_rel_diff"], r.key, r.threads, name) for r in rows if r.report
             for name, e in r.report["engines"].items() if e.get("output_rel_diff") is not None]
    if diffs:
        worst = max(diffs)
        generated += [f"Same computation: the largest difference of a peer's outputs from parsicore's over every row "
                      f"is {worst[0]:.1e} of the output scale ({worst[3]}, {label(worst[1])}, {worst[2]} thread(s)).",
                      ""]
    if rows and not plot_note:
        generated += [f"![latency against the fraction of kernels on]({os.path.relpath(args.plot, args.doc.parent)})",
                      ""]
    elif plot_note:
        notes.append(f"plot: {plot_note}")
    letters = code_letters(rows)
    if letters:
        notes.append("the engine's source changed while the matrix ran (the kernels are being optimised at the "
                     "same time): the letter after the thread count names the version a row ran ("
                     + ", ".join(f"{v.strip()[1:-1]} = sources {k}" for k, v in letters.items())
                     + "); only rows with the same letter compare")
    generated += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    print("\n".join(generated))
    if json_out:
        json_out.write_text(json.dumps({**record(), "finished": finished}, indent=1))
    if args.write_doc:
        write_doc(args.doc, generated)


if __name__ == "__main__":
    main()

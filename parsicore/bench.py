"""Benchmark parsicore against ONNX Runtime and PyTorch on the same weights, input and thread count.

How a run is made fair:

- Same weights: ONNX Runtime runs the ONNX export of the model (:mod:`parsicore.export.onnx_export`), PyTorch
  runs it through :class:`parsicore.export.torch_runner.TorchRunner`. Both compute gates densely and multiply
  the mask, the only way they can run them; a run-time threshold / keep ratio is baked into both.
- Same input: standard-normal float32 of the model's input shape, from a fixed seed.
- Same threads: ``parsicore.load(threads=N)`` (and BLAS limited to N through threadpoolctl when installed),
  ONNX Runtime ``intra_op_num_threads=N, inter_op_num_threads=1``, ``torch.set_num_threads(N)``.
- Interleaved in short turns: ``block`` calls of each engine in turn (parsicore x4, onnxruntime x4, torch x4,
  parsicore x4, ...), so a load change on a shared machine hits every engine alike; the first ``warmup`` rounds
  (one call each) are not recorded, nor is the first call of each turn. That call follows another engine's,
  whose pool threads may still be spinning on the cores (parsicore's OpenMP threads ~1.5 ms on x86-64, see
  :mod:`parsicore.threads`; ONNX Runtime's ~0.5 ms even with ``session.intra_op.allow_spinning = 0``, measured
  one-off as process CPU time against wall time on a 2-vCPU VM; PyTorch's OpenMP threads read the same environment as
  parsicore's) and whose data has just filled the caches: timing it would measure the neighbour, not the engine.
  With ``block=1`` every call is timed and engines alternate call by call (the tables up to the fourteenth
  session's were made so). ONNX Runtime's pool is still told not to spin between calls (its default spins ~20
  ms after each call, longer than a turn).

Reported per engine: median and p90 latency of a call (batch included), GFLOP/s on the MACs the engine
executes (``2 * MACs / median``: parsicore's ``RunStats.macs_executed``, the dense count for the peers), the
ratio parsicore/peer of the medians, the largest difference of the peer's outputs from parsicore's (relative
to the output scale, a sanity check that they computed the same thing) and, with ``isolate``, the peak RSS of
each engine alone in a fresh process. A peer that is not installed (or cannot run the model) is skipped with
a one-line reason, never an error.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parsicore.errors import InputError, ParsicoreError
from parsicore.format import ModelFile, read_model

PEERS = ("onnxruntime", "torch")
ENGINES = ("parsicore", *PEERS)
#: Accepted spellings of the peers in ``--compare``.
PEER_ALIASES = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "torch": "torch", "pytorch": "torch"}
INPUT_SEED = 0


class PeerUnavailable(Exception):
    """A peer engine cannot run here (not installed, or the model does not export); the message says why."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. threshold / keep: per-call gate overrides (None: the model's own)."""

    threads: int
    runs: int = 30
    warmup: int = 3
    threshold: float | None = None
    keep: float | None = None
    batch: int = 1
    backend: str | None = None
    compare: tuple[str, ...] = PEERS
    isolate: bool = False
    seed: int = INPUT_SEED
    #: Calls of one engine in a row; the first of each turn is untimed (1: every call timed, engines call by call).
    block: int = 4


@dataclass
class EngineResult:
    """One engine's measurements. latencies_ms: one entry per recorded call (batch included)."""

    engine: str
    version: str
    macs_per_call: int
    load_ms: float
    latencies_ms: list[float] = field(default_factory=list)
    output_rel_diff: float | None = None  # peers: max |peer - parsicore| / max |parsicore|
    isolated_peak_rss_mb: float | None = None

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90))

    @property
    def gflops(self) -> float:
        """GFLOP/s on the MACs this engine executes (2 FLOPs per MAC) at the median latency."""
        return 2.0 * self.macs_per_call / (self.median_ms * 1e-3) / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {
            # Microsecond models (a small CNN on ONNX Runtime: ~25 us) need more than 4 decimals of ms for their
            # ratios to be recomputed from the JSON to 0.1 %.
            "engine": self.engine, "version": self.version, "median_ms": round(self.median_ms, 6),
            "p90_ms": round(self.p90_ms, 6), "min_ms": round(min(self.latencies_ms), 6),
            "gflops": round(self.gflops, 2), "macs_per_call": self.macs_per_call, "load_ms": round(self.load_ms, 1),
            "output_rel_diff": self.output_rel_diff, "isolated_peak_rss_mb": self.isolated_peak_rss_mb,
            "latencies_ms": [round(v, 4) for v in self.latencies_ms],
        }


@dataclass
class BenchReport:
    """Everything one benchmark measured; ``as_dict`` is the ``--json`` output."""

    model: str
    name: str
    input_shape: tuple[int, ...]
    config: BenchConfig
    backend: str
    macs_dense: int
    macs_executed: int
    kernels_on: float
    kernels_total: int
    engines: list[EngineResult]
    skipped: dict[str, str]
    peak_rss_mb: float
    blas_threads: int | None

    @property
    def macs_fraction(self) -> float:
        return self.macs_executed / self.macs_dense if self.macs_dense else 1.0

    @property
    def kernels_fraction(self) -> float | None:
        """Mean fraction of the gated layers' kernels that ran (None: no gated layer)."""
        return self.kernels_on / self.kernels_total if self.kernels_total else None

    def engine(self, name: str) -> EngineResult | None:
        return next((e for e in self.engines if e.engine == name), None)

    def ratios(self) -> dict[str, float]:
        """parsicore median / peer median, per peer that ran."""
        ours = self.engine("parsicore")
        if ours is None:
            return {}
        return {e.engine: ours.median_ms / e.median_ms for e in self.engines if e.engine != "parsicore"}

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": self.model, "name": self.name, "input_shape": list(self.input_shape),
            "threads": c.threads, "runs": c.runs, "warmup": c.warmup, "batch": c.batch, "threshold": c.threshold,
            "keep": c.keep, "backend": self.backend, "order": "interleaved" if c.block == 1 else "turns",
            "block": c.block, "input_seed": c.seed,
            "macs_dense": self.macs_dense, "macs_executed": self.macs_executed,
            "macs_fraction": round(self.macs_fraction, 6),
            "kernels_fraction": None if self.kernels_fraction is None else round(self.kernels_fraction, 6),
            "engines": {e.engine: e.as_dict() for e in self.engines},
            "ratios": {k: round(v, 4) for k, v in self.ratios().items()},
            "skipped": dict(self.skipped),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_rss_note": "this process, every engine loaded in it" + (
                "; isolated_peak_rss_mb per engine: each alone in a fresh process" if c.isolate else ""),
            "blas_threads": self.blas_threads,
        }


# ----------------------------------------------------------------------------------------------- engines


@dataclass
class _Prepared:
    """A ready engine: ``call()`` runs it once on the benchmark input and returns its outputs by name."""

    name: str
    version: str
    call: Callable[[], Mapping[str, np.ndarray]]
    load_ms: float
    macs_per_call: int


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _prepare_parsicore(model_file: ModelFile, feeds: dict[str, np.ndarray], cfg: BenchConfig) -> tuple[_Prepared, Any]:
    from parsicore import __version__
    from parsicore.api import load

    t0 = time.perf_counter()
    model = load(model_file, backend=cfg.backend, threads=cfg.threads)
    load_ms = (time.perf_counter() - t0) * 1000

    def call() -> Mapping[str, np.ndarray]:
        return model.run_with_stats(feeds, threshold=cfg.threshold, keep=cfg.keep)[0]

    _, stats = model.run_with_stats(feeds, threshold=cfg.threshold, keep=cfg.keep)
    prepared = _Prepared("parsicore", f"{__version__} ({model.backend})", call, load_ms, stats.macs_executed)
    return prepared, (model, stats)


def export_for_onnxruntime(model_file: ModelFile, path: Path, cfg: BenchConfig) -> Path:
    """The ONNX file ONNX Runtime runs (threshold / keep baked in); PeerUnavailable when it cannot be made."""
    try:
        from parsicore.export.onnx_export import export_onnx

        export_onnx(model_file, path, threshold=cfg.threshold, keep=cfg.keep)
    except ParsicoreError as e:
        raise PeerUnavailable(f"ONNX export failed: {e}") from e
    return path


def ort_session(onnx_path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with the benchmark's settings (``threads`` intra-op, 1 inter-op, all graph
    optimisations); PeerUnavailable when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise PeerUnavailable("onnxruntime is not installed (pip install 'parsicore[onnx]')") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def _prepare_onnxruntime(model_file: ModelFile, feeds: dict[str, np.ndarray], cfg: BenchConfig, macs: int,
                         workdir: Path) -> _Prepared:
    try:
        import onnxruntime  # noqa: F401 - only to report a missing peer before exporting
    except ImportError as e:
        raise PeerUnavailable("onnxruntime is not installed (pip install 'parsicore[onnx]')") from e
    path = export_for_onnxruntime(model_file, workdir / "model.onnx", cfg)
    t0 = time.perf_counter()
    session = ort_session(path, cfg.threads)
    load_ms = (time.perf_counter() - t0) * 1000
    names = [o.name for o in session.get_outputs()]

    def call() -> Mapping[str, np.ndarray]:
        return dict(zip(names, session.run(None, feeds)))

    return _Prepared("onnxruntime", _version("onnxruntime"), call, load_ms, macs)


def _prepare_torch(model_file: ModelFile, feeds: dict[str, np.ndarray], cfg: BenchConfig, macs: int) -> _Prepared:
    try:
        import torch
    except ImportError as e:
        raise PeerUnavailable("torch is not installed (pip install 'parsicore[torch]')") from e
    from parsicore.export.torch_runner import TorchRunner

    t0 = time.perf_counter()
    try:
        runner = TorchRunner(model_file, threshold=cfg.threshold, keep=cfg.keep, threads=cfg.threads)
    except ParsicoreError as e:
        raise PeerUnavailable(f"the model does not run in PyTorch: {e}") from e
    load_ms = (time.perf_counter() - t0) * 1000
    tensors = runner.to_tensors(feeds)
    names = runner.graph.outputs
    module = runner.module

    def call() -> Mapping[str, np.ndarray]:
        with torch.inference_mode():
            outs = module(*tensors)
        return {n: t.numpy() for n, t in zip(names, outs)}

    return _Prepared("torch", torch.__version__, call, load_ms, macs)


# ----------------------------------------------------------------------------------------------- running


def random_feeds(model_file: ModelFile, batch: int, seed: int = INPUT_SEED) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs of the model's shapes, the same for every engine (fixed seed)."""
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal((batch, *t.feature_shape)).astype(np.float32) for t in model_file.inputs}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@contextmanager
def blas_limited(threads: int) -> Iterator[int | None]:
    """Limit numpy's BLAS to ``threads`` while benchmarking (threadpoolctl, when installed); yields the limit."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield None
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield threads


def _rel_diff(ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> float:
    worst = 0.0
    for name, value in ours.items():
        other = np.asarray(theirs.get(name))
        if other.shape != value.shape:
            return float("inf")
        scale = max(float(np.abs(value).max()), 1e-12)
        worst = max(worst, float(np.abs(other - value).max()) / scale)
    return worst


def timed_turns(cfg: BenchConfig) -> int:
    """Turns of ``cfg.block`` calls per engine that give ``cfg.runs`` timed calls each."""
    per_turn = cfg.block - 1 if cfg.block > 1 else 1
    return -(-cfg.runs // per_turn)


def total_calls(cfg: BenchConfig, engines: int) -> int:
    """Every call a benchmark of ``engines`` engines makes (warm-up included): the progress bar's length."""
    return (cfg.warmup + timed_turns(cfg) * cfg.block) * engines


def run_benchmark(model: str | os.PathLike[str] | ModelFile, cfg: BenchConfig,
                  progress: Callable[[int], None] | None = None,
                  on_skip: Callable[[str, str], None] | None = None) -> BenchReport:
    """Benchmark ``model`` (a path or a ModelFile) under ``cfg``.

    progress(n): called after every timed or warm-up call. on_skip(engine, reason): called when a peer is
    skipped. Raises ParsicoreError for a bad model/option; peers never raise (they are skipped).
    """
    if cfg.runs < 1 or cfg.warmup < 0 or cfg.batch < 1 or cfg.threads < 1 or cfg.block < 1:
        raise InputError("runs, batch, threads and block must be >= 1 and warmup >= 0")
    model_file = model if isinstance(model, ModelFile) else read_model(model)
    label = model_file.source if not isinstance(model, (str, os.PathLike)) else str(model)
    feeds = random_feeds(model_file, cfg.batch, cfg.seed)
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="parsicore-bench-") as tmp, blas_limited(cfg.threads) as blas:
        ours, (pc_model, stats) = _prepare_parsicore(model_file, feeds, cfg)
        engines = [ours]
        for peer in cfg.compare:
            try:
                if peer == "onnxruntime":
                    engines.append(_prepare_onnxruntime(model_file, feeds, cfg, stats.macs_dense, Path(tmp)))
                else:
                    engines.append(_prepare_torch(model_file, feeds, cfg, stats.macs_dense))
            except PeerUnavailable as e:
                skipped[peer] = str(e)
                if on_skip:
                    on_skip(peer, str(e))
        results = {e.name: EngineResult(e.name, e.version, e.macs_per_call, e.load_ms) for e in engines}
        reference = ours.call()
        for e in engines[1:]:
            results[e.name].output_rel_diff = _rel_diff(reference, e.call())
        for _ in range(cfg.warmup):
            for e in engines:
                e.call()
                if progress:
                    progress(1)
        untimed = 1 if cfg.block > 1 else 0
        for _ in range(timed_turns(cfg)):
            for e in engines:
                for j in range(cfg.block):
                    t0 = time.perf_counter()
                    e.call()
                    elapsed = (time.perf_counter() - t0) * 1000
                    latencies = results[e.name].latencies_ms
                    if j >= untimed and len(latencies) < cfg.runs:
                        latencies.append(elapsed)
                    if progress:
                        progress(1)
        if cfg.isolate:
            onnx_path = Path(tmp) / "model.onnx"
            for e in engines:
                results[e.name].isolated_peak_rss_mb = isolated_peak_rss_mb(
                    e.name, model_file, cfg, onnx_path if e.name == "onnxruntime" else None, Path(tmp))
    return BenchReport(
        model=label, name=str(model_file.metadata.get("name", "")),
        input_shape=tuple(next(iter(feeds.values())).shape), config=cfg, backend=pc_model.backend,
        macs_dense=stats.macs_dense, macs_executed=stats.macs_executed, kernels_on=stats.kernels_on,
        kernels_total=stats.kernels_total, engines=[results[e.name] for e in engines], skipped=skipped,
        peak_rss_mb=peak_rss_mb(), blas_threads=blas,
    )


# ----------------------------------------------------------------------------------------------- isolated RSS

#: The isolated children import only what their engine needs: the onnxruntime child does not even import
#: parsicore (whose import would count against ONNX Runtime). Same input rule as random_feeds.
_CHILD_COMMON = r"""
import json, sys
import numpy as np
job = json.loads(sys.argv[1])
rng = np.random.default_rng(job["seed"])
feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in job["inputs"]}
"""
_CHILDREN = {
    "parsicore": _CHILD_COMMON + r"""
import parsicore
model = parsicore.load(job["model"], backend=job["backend"], threads=job["threads"])
for _ in range(job["runs"]):
    model.run_with_stats(feeds, threshold=job["threshold"], keep=job["keep"])
""",
    "onnxruntime": _CHILD_COMMON + r"""
import onnxruntime as ort
opts = ort.SessionOptions()  # as bench.ort_session
opts.intra_op_num_threads = job["threads"]
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
session = ort.InferenceSession(job["onnx"], opts, providers=["CPUExecutionProvider"])
for _ in range(job["runs"]):
    session.run(None, feeds)
""",
    "torch": _CHILD_COMMON + r"""
import torch
from parsicore.export.torch_runner import TorchRunner
runner = TorchRunner(job["model"], threshold=job["threshold"], keep=job["keep"], threads=job["threads"])
tensors = runner.to_tensors(feeds)
for _ in range(job["runs"]):
    with torch.inference_mode():
        runner.module(*tensors)
""",
}


def isolated_peak_rss_mb(engine: str, model_file: ModelFile, cfg: BenchConfig, onnx_path: Path | None,
                         workdir: Path) -> float | None:
    """Peak RSS (MiB) of a fresh Python process that loads only ``engine`` and runs it warmup + 3 times.

    The parsicore and torch children read the model file (written to ``workdir`` when ``model_file`` came
    from memory); the onnxruntime child reads the exported ``onnx_path``. None when the child fails.
    """
    path = model_file.source
    if engine != "onnxruntime" and (not path or not Path(path).is_file()):
        from parsicore.format import write_model

        path = str(workdir / "model.h5")
        write_model(model_file, path)
    inputs = [(t.name, [cfg.batch, *t.feature_shape]) for t in model_file.inputs]
    job = {"model": path, "onnx": str(onnx_path) if onnx_path else None, "inputs": inputs,
           "threads": cfg.threads, "threshold": cfg.threshold, "keep": cfg.keep, "backend": cfg.backend,
           "runs": max(1, cfg.warmup) + 3, "seed": cfg.seed}
    return command_peak_rss_mb([sys.executable, "-c", _CHILDREN[engine], json.dumps(job)])


#: A small Python process that runs the command as its child and prints the child's own ru_maxrss (KiB).
#: Needed because on Linux a process's ru_maxrss starts at the RSS of the process that forked it (exec
#: records the forked copy's high-water mark): measured straight from a benchmark holding hundreds of MiB,
#: every child would report at least that. Forked from this launcher, the floor is the launcher's ~10 MiB.
_LAUNCHER = r"""
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss if os.waitstatus_to_exitcode(status) == 0 else -1)
"""


def command_peak_rss_mb(argv: Sequence[str], env: Mapping[str, str] | None = None,
                        cwd: str | os.PathLike[str] | None = None) -> float | None:
    """Run ``argv`` to completion (its output discarded) and return its peak RSS in MiB, None if it failed."""
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True,
                          env=None if env is None else dict(env), cwd=cwd, check=False)
    try:
        rss = int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if rss < 0:
        return None
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


__all__ = ["ENGINES", "PEERS", "BenchConfig", "BenchReport", "EngineResult", "PeerUnavailable", "blas_limited",
           "command_peak_rss_mb", "export_for_onnxruntime", "isolated_peak_rss_mb", "ort_session", "peak_rss_mb",
           "random_feeds", "run_benchmark"]

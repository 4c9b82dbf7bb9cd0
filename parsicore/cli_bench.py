"""``parsicore bench MODEL``: latency of parsicore beside ONNX Runtime and PyTorch on the same weights.

The logic lives in :mod:`parsicore.bench`; this module parses options, shows a progress bar on stderr and
prints a table (or ``--json``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from parsicore.bench import PEER_ALIASES, PEERS, BenchConfig, BenchReport, run_benchmark, total_calls
from parsicore.format import read_model


def _parse_compare(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    out: list[str] = []
    for part in value.split(","):
        name = part.strip().lower()
        if name not in PEER_ALIASES:
            raise click.BadParameter(f"unknown engine {part.strip()!r} (choose from {', '.join(PEERS)}, or none)")
        if PEER_ALIASES[name] not in out:
            out.append(PEER_ALIASES[name])
    return tuple(out)


def _default_threads(ctx: click.Context) -> int:
    """The board profile's thread count (as ``parsicore run`` uses), else the CPUs this process may use."""
    settings = ctx.find_root().obj
    value = getattr(getattr(settings, "threads", None), "value", None)
    if isinstance(value, int) and value >= 1:
        return value
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@click.command(name="bench")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for every engine (default: the board profile's).")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed calls per engine.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed rounds first (JIT compile, caches).")
@click.option("--block", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calls of one engine in a row; the first of each turn is untimed (1: engines call by call, every "
                   "call timed).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="LKAM gate threshold for every engine (default: the model's).")
@click.option("--keep", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Top-k gate keep ratio for every engine (default: the model's).")
@click.option("--batch", type=click.IntRange(min=1, max=4096), default=1, show_default=True, help="Images per call.")
@click.option("--backend", type=click.Choice(["numba", "numpy", "reference"]), default=None,
              help="parsicore's backend (default: numba if installed, else numpy).")
@click.option("--compare", default=",".join(PEERS), show_default=True, callback=_parse_compare,
              help="Peers to run beside parsicore, comma-separated (onnxruntime, torch) or none.")
@click.option("--isolate", is_flag=True,
              help="Also measure each engine's peak RSS alone in a fresh process (the in-process figure "
                   "counts every engine loaded together).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.pass_context
def bench(ctx: click.Context, model_path: Path, threads: int | None, runs: int, warmup: int, block: int,
          threshold: float | None, keep: float | None, batch: int, backend: str | None, compare: tuple[str, ...],
          isolate: bool, as_json: bool) -> None:
    """Median and p90 latency of MODEL_PATH in parsicore and its peers, calls interleaved, same input and threads."""
    cfg = BenchConfig(threads=threads or _default_threads(ctx), runs=runs, warmup=warmup, threshold=threshold,
                      keep=keep, batch=batch, backend=backend, compare=compare, isolate=isolate, block=block)

    def skipped(engine: str, reason: str) -> None:
        click.echo(f"parsicore: {engine} skipped: {reason}", err=True)

    model_file = read_model(model_path)  # a bad file fails here, in one line, before the progress bar starts
    total = total_calls(cfg, 1 + len(cfg.compare))
    with click.progressbar(length=total, file=sys.stderr, label="bench") as bar:
        report = run_benchmark(model_file, cfg, progress=bar.update, on_skip=skipped)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for line in format_report(report):
            click.echo(line)


def format_report(report: BenchReport) -> list[str]:
    """The human-readable table of a report."""
    c = report.config
    over = []
    if c.threshold is not None:
        over.append(f"threshold {c.threshold:g}")
    if c.keep is not None:
        over.append(f"keep {c.keep:g}")
    lines = [
        f"model: {report.model}" + (f" ({report.name})" if report.name else ""),
        f"input {tuple(report.input_shape)}, threads {c.threads}, {c.runs} runs after {c.warmup} warm-up, "
        + ("calls interleaved" if c.block == 1 else f"engines in turns of {c.block} calls (the first untimed)")
        + (f", {', '.join(over)}" if over else ""),
    ]
    kernels = "" if report.kernels_fraction is None else f"; gated kernels on {report.kernels_fraction:.1%}"
    lines.append(f"MACs per call: {report.macs_dense:,} dense; parsicore executed {report.macs_fraction:.1%}{kernels}")
    ratios = report.ratios()
    rows: list[tuple[Any, ...]] = [("engine", "version", "median ms", "p90 ms", "GFLOP/s", "parsicore/peer",
                                    "load ms", "out diff")]
    for e in report.engines:
        rows.append((e.engine, e.version, f"{e.median_ms:.3f}", f"{e.p90_ms:.3f}", f"{e.gflops:.1f}",
                     f"{ratios[e.engine]:.2f}x" if e.engine in ratios else "-", f"{e.load_ms:.0f}",
                     "-" if e.output_rel_diff is None else f"{e.output_rel_diff:.1e}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = (str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        lines.append("  ".join(cells))
    lines.append(f"peak RSS: {report.peak_rss_mb:.0f} MiB (this process, every engine loaded in it)")
    isolated = [f"{e.engine} {e.isolated_peak_rss_mb:.0f} MiB" for e in report.engines
                if e.isolated_peak_rss_mb is not None]
    if isolated:
        lines.append(f"peak RSS alone in a fresh process: {', '.join(isolated)}")
    for engine, reason in report.skipped.items():
        lines.append(f"skipped: {engine} ({reason})")
    return lines

"""``parsicore warmup [MODEL]``: compile (or load from cache) every Numba kernel a model needs, once.

Numba's on-disk cache is keyed to the CPU and the source, so each board compiles on its first run; doing it
at install time keeps that delay off the first image. Without Numba there is nothing to compile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

#: Gate overrides run after the model's own setting, so both the gated (index-list) and the dense
#: variants of each kernel get compiled: (threshold, keep). threshold 1.0 / keep ~0 switch kernels off,
#: threshold 0.0 / keep 1.0 switch them on.
GATE_SETTINGS = ((None, None), (0.0, 1.0), (1.0, 0.01))


@click.command(name="warmup")
@click.argument("model_path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Compute threads.")
def warmup(model_path: Path | None, threads: int | None) -> None:
    """Compile the Numba kernels MODEL needs (default: the shipped model) and report the time and cache dir."""
    from parsicore.kernels import numba_available

    if not numba_available():
        click.echo("numba is not installed: nothing to compile (the numpy backend needs no warm-up)")
        return
    from parsicore.api import default_model_path, load

    t0 = time.perf_counter()
    model = load(model_path, backend="numba", threads=threads)  # imports numba, which sets NUMBA_CACHE_DIR
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    cached_before = _cache_entries(cache_dir)
    t_load = time.perf_counter() - t0
    t_first = compile_kernels(model)
    t_again = compile_kernels(model)
    added = _cache_entries(cache_dir) - cached_before
    click.echo(f"model: {model_path or default_model_path()}")
    click.echo(f"numba kernels ready: load {t_load:.2f} s, first runs {t_first:.2f} s "
               f"(compile or cache load), runs again {t_again * 1000:.1f} ms")
    if cache_dir:
        click.echo(f"cache dir: {cache_dir} ({added} kernel(s) newly compiled and cached, "
                   f"{cached_before} cached before)")
    else:
        click.echo("cache dir: none writable, so kernels compile again in every process "
                   "(set PARSICORE_CACHE_DIR to a writable directory)")


def compile_kernels(model: Any) -> float:
    """Run ``model`` (a parsicore Model) on random input once per :data:`GATE_SETTINGS`, so that every Numba
    kernel it needs, gated and dense, is compiled or loaded from the cache; returns the seconds it took.
    Random, not zeros: on a constant input the model's own gates may switch whole layers on or off, and the
    gathered kernels that a mixed pattern calls would then load on the first real image."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal((1, *t.shape[1:]), dtype=np.float32) for t in model.inputs}
    t0 = time.perf_counter()
    for threshold, keep in GATE_SETTINGS:
        model.run_with_stats(feeds, threshold=threshold, keep=keep)
    return time.perf_counter() - t0


def _cache_entries(cache_dir: str | None) -> int:
    """Compiled kernels in Numba's cache directory (one .nbc file per signature)."""
    if not cache_dir or not Path(cache_dir).is_dir():
        return 0
    return sum(1 for _ in Path(cache_dir).rglob("*.nbc"))

"""The ``parsicore`` command: parse options, call the public API, print.

Every expected failure (bad model, image, option) ends in one line on stderr and exit code 2; a run over
many images where some failed exits 1. Commands other than run/info/eval live in their own modules and
are imported only when used, so start-up stays fast.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from parsicore.errors import ParsicoreError

EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 1

#: ``run`` over fewer images than this uses the numpy backend unless a backend is asked for (--backend or
#: PARSICORE_BACKEND): importing Numba and loading its cached kernels costs ~1 s and ~130 MiB, more than
#: its faster kernels save on a few images (PERFORMANCE.md, "Start-up").
RUN_NUMBA_MIN_IMAGES = 256

#: Subcommands defined in other modules: name -> "module:attribute" (imported on use).
LAZY_COMMANDS: dict[str, str] = {
    "bench": "parsicore.cli_bench:bench",
    "boards": "parsicore.cli_boards:boards_command",
    "check": "parsicore.cli_check:check",
    "convert": "parsicore.cli_convert:convert",
    "warmup": "parsicore.cli_warmup:warmup",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


def _version() -> str:
    from parsicore import __version__

    return __version__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="parsicore")
@click.option("--board", metavar="NAME", default=None,
              help="Board profile to use instead of the detected one (see `parsicore boards`; env PARSICORE_BOARD).")
@click.pass_context
def cli(ctx: click.Context, board: str | None) -> None:
    """CNN inference on embedded CPUs; gated kernels that are off are never computed."""
    if ctx.obj is None:  # invoked without main() (e.g. click's test runner): settings, no environment changes
        from parsicore.boards import resolve

        ctx.obj = resolve(board)


# ----------------------------------------------------------------------------------------------- options

backend_option = click.option("--backend", type=click.Choice(["numba", "numpy", "reference"]), default=None,
                              help="Compute backend (default: numba if installed, else numpy).")
run_backend_option = click.option(
    "--backend", type=click.Choice(["numba", "numpy", "reference"]), default=None,
    help=f"Compute backend (default: numpy for fewer than {RUN_NUMBA_MIN_IMAGES} images, which skips Numba's "
    "start-up; numba if installed for more).")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None, help="Compute threads.")
model_option = click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                            help="Model file (default: the shipped gated Fashion-MNIST model).")


def load_model(path: Path | None, backend: str | None, threads: int | None) -> Any:
    """parsicore.load with the CLI's defaults (shared by every subcommand)."""
    from parsicore.api import load

    return load(path, backend=backend, threads=threads)


# ----------------------------------------------------------------------------------------------- info


@cli.command()
@click.argument("model_path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@backend_option
def info(model_path: Path | None, backend: str | None) -> None:
    """Per-layer table of MODEL (op, output shape, params, MACs) and the engine's settings."""
    from parsicore.api import default_model_path
    from parsicore.kernels import default_backend, numba_available

    model = load_model(model_path, backend, None)
    meta = model.metadata
    click.echo(f"parsicore {_version()}  backend: {model.backend} (default here: {default_backend()}; "
               f"numba {'available' if numba_available() else 'not installed'})")
    click.echo(f"model: {model_path or default_model_path()}")
    click.echo(f"name: {meta.get('name', '')}  license: {meta.get('license', '')}  "
               f"producer: {meta.get('producer', '')}")
    for t in model.inputs:
        click.echo(f"input  {t.name}: {_shape(t.shape)}")
    for t in model.outputs:
        click.echo(f"output {t.name}: {_shape(t.shape)}")
    g = model.graph
    rows = [(n.name, n.type, _shape((None, *n.out_shapes[0])), n.params, n.macs) for n in g.nodes]
    widths = [max(len(str(r[i])) for r in rows + [("node", "op", "output", "params", "MACs")]) for i in range(5)]
    header = ("node", "op", "output", "params", "MACs")
    click.echo("  ".join(str(h).ljust(w) if i < 3 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        click.echo("  ".join(str(v).ljust(w) if i < 3 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    gated = len(model.plan.gated_steps)
    click.echo(f"total: {len(g.nodes)} nodes, {g.total_params:,} params, {g.total_macs:,} MACs per image (dense); "
               f"{gated} gated conv layer(s)")


def _shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


# ----------------------------------------------------------------------------------------------- run


def _expand_images(paths: Sequence[Path]) -> list[Path]:
    from parsicore.datasets import IMAGE_SUFFIXES

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise click.UsageError(f"{p}: directory holds no images")
            out.extend(found)
        else:
            out.append(p)
    return out


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_option
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=3, show_default=True, help="Labels to show.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Override the LKAM gates' threshold (0..1): higher runs less of the network.")
@click.option("--keep", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Override the top-k gates' keep ratio (0..1].")
@run_backend_option
@threads_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@click.option("--gate-map", "gate_map_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of the kernels each gated layer ran (one image: this path; several: -<stem> added).")
def run(images: tuple[Path, ...], model_path: Path | None, top_k: int, threshold: float | None,
        keep: float | None, backend: str | None, threads: int | None, as_json: bool,
        gate_map_path: Path | None) -> None:
    """Classify IMAGE(s) (files or directories): top-k labels, latency, fraction of the network run."""
    from parsicore.image import check_preprocessing, load_image
    from parsicore.postprocess import to_probabilities
    from parsicore.postprocess import top_k as top_k_of

    paths = _expand_images(images)
    model = load_model(model_path, run_backend(backend, len(paths), os.environ), threads)
    pre = check_preprocessing(model.metadata.get("preprocessing"), model.source)
    if model.backend == "numba":
        # Loading Numba's cached kernels (or compiling them) happens on their first call: ~1 s that
        # would otherwise be reported as the first image's latency.
        from parsicore.cli_warmup import compile_kernels

        ready = compile_kernels(model)
        click.echo(f"parsicore: notice: numba kernels ready in {ready:.2f} s (loaded from the cache or compiled; "
                   f"not part of the latencies below)", err=True)
    labels = model.labels
    kind = model.metadata.get("output_kind", "logits")
    failures = 0
    show_bar = len(paths) > 1
    bar = click.progressbar(length=len(paths), file=sys.stderr, label="images") if show_bar else None
    if bar:
        bar.__enter__()
    try:
        for path in paths:
            try:
                t0 = time.perf_counter()
                x = load_image(path, pre)
                decode_ms = (time.perf_counter() - t0) * 1000
                out, stats = model.run_with_stats(x, threshold=threshold, keep=keep)
            except ParsicoreError as e:
                if len(paths) == 1:
                    raise
                failures += 1
                click.echo(f"parsicore: error: {e}", err=True)
                if bar:
                    bar.update(1)
                continue
            probs = to_probabilities(next(iter(out.values())), kind)[0]
            top = top_k_of(probs, labels, top_k)
            if as_json:
                record = {
                    "image": str(path),
                    "top": [{"label": p.label, "index": p.index, "prob": round(p.prob, 6)} for p in top],
                    "latency_ms": round(stats.latency_ms, 3), "decode_ms": round(decode_ms, 3),
                    "macs_executed": stats.macs_executed, "macs_dense": stats.macs_dense,
                    "macs_fraction": round(stats.macs_fraction, 4),
                    "kernels_on": stats.kernels_on, "kernels_total": stats.kernels_total,
                    "backend": model.backend,
                }
                click.echo(json.dumps(record))
            else:
                best = ", ".join(f"{p.label} {p.prob:.1%}" for p in top)
                gated = (f"; kernels on {stats.kernels_on:.0f}/{stats.kernels_total}" if stats.kernels_total else "")
                click.echo(f"{path}: {best}")
                click.echo(f"  latency {stats.latency_ms:.2f} ms ({model.backend}); MACs executed "
                           f"{stats.macs_executed:,} of {stats.macs_dense:,} ({stats.macs_fraction:.1%}){gated}")
            if gate_map_path is not None:
                from parsicore import drawing

                target = gate_map_path if len(paths) == 1 else gate_map_path.with_name(
                    f"{gate_map_path.stem}-{path.stem}{gate_map_path.suffix or '.png'}")
                drawing.gate_map(_gate_layers(model, x, threshold, keep), target)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.__exit__(None, None, None)
    if failures:
        click.echo(f"parsicore: {failures} of {len(paths)} image(s) failed", err=True)
        sys.exit(EXIT_BAD_INPUT if failures == len(paths) else EXIT_PARTIAL)


def run_backend(asked: str | None, images: int, environ: Mapping[str, str]) -> str | None:
    """The backend ``run`` loads with: the asked one (--backend, else PARSICORE_BACKEND, which a board profile may
    set); else numpy for fewer than RUN_NUMBA_MIN_IMAGES images; else None (the library default, numba if
    installed)."""
    if asked is not None or environ.get("PARSICORE_BACKEND"):
        return asked
    return "numpy" if images < RUN_NUMBA_MIN_IMAGES else None


def _gate_layers(model: Any, x: Any, threshold: float | None, keep: float | None) -> list[tuple[str, Any]]:
    """Per gated conv: which kernels were on for image 0 (from the captured mask tensors)."""
    tensors, _ = model.run_with_stats(x, threshold=threshold, keep=keep, capture=True)
    return [(s.name, tensors[s.gate_mask][0] != 0) for s in model.plan.gated_steps]


# ----------------------------------------------------------------------------------------------- eval


def _parse_thresholds(text: str | None) -> list[float | None]:
    if not text:
        return [None]
    out: list[float | None] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number", param_hint="--thresholds") from None
        if not 0.0 <= value <= 1.0:
            raise click.BadParameter(f"{value} is outside [0, 1]", param_hint="--thresholds")
        out.append(value)
    return out


@cli.command(name="eval")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--thresholds", default=None, help="Comma-separated gate thresholds, e.g. 0.3,0.5,0.7 "
              "(default: the model's own).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write accuracy against executed MACs as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--batch", type=click.IntRange(min=1, max=4096), default=256, show_default=True)
@backend_option
@threads_option
def eval_command(model_path: Path, data: Path, thresholds: str | None, plot_path: Path | None, as_json: bool,
                 limit: int | None, batch: int, backend: str | None, threads: int | None) -> None:
    """Accuracy and mean executed MACs of MODEL_PATH on DATA (idx files, or one sub-folder per class)."""
    from dataclasses import replace

    from parsicore import drawing
    from parsicore.datasets import open_labelled_set
    from parsicore.evaluate import evaluate

    values = _parse_thresholds(thresholds)
    model = load_model(model_path, backend, threads)
    data_set = open_labelled_set(data, model.labels)
    if limit:
        data_set = replace(data_set, labels=data_set.labels[:limit],
                           pixels=None if data_set.pixels is None else data_set.pixels[:limit],
                           paths=data_set.paths[:limit],
                           description=f"the first {min(limit, len(data_set))} of {data_set.description}")
    with click.progressbar(length=len(data_set) * len(values), file=sys.stderr, label="eval") as bar:
        points = evaluate(model, data_set, values, batch=batch, progress=bar.update)
    if as_json:
        click.echo(json.dumps({"model": str(model_path), "data": data_set.description, "backend": model.backend,
                               "points": [p.__dict__ for p in points]}))
    else:
        click.echo(f"{model_path} on {data_set.description} ({model.backend})")
        click.echo("threshold  accuracy  conv MACs executed  all MACs executed (gates included)")
        for p in points:
            t = "model" if p.threshold is None else f"{p.threshold:.2f}"
            click.echo(f"{t:>9}  {p.accuracy:8.2%}  {p.conv_macs_fraction:18.1%}  {p.macs_fraction:17.1%}")
    if plot_path is not None:
        drawing.curve([(p.macs_fraction, p.accuracy, "model" if p.threshold is None else f"t={p.threshold:g}")
                       for p in points], plot_path,
                      title=f"{model.metadata.get('name', model_path)}: accuracy vs compute")


# ----------------------------------------------------------------------------------------------- entry


def _apply_board(args: Sequence[str]) -> Any:
    """Resolve the board profile (--board, PARSICORE_BOARD or detection) and export its settings.

    First thing in main(): OpenBLAS reads its kernel choice and thread count when numpy is first imported.
    """
    from parsicore.boards import apply_to_environment, board_option_value, resolve

    settings = resolve(board_option_value(args))
    apply_to_environment(settings)
    if settings.notice:
        click.echo(f"parsicore: notice: {settings.notice}", err=True)
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line and exit 2 for every expected error, never a traceback."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        settings = _apply_board(args)
        code = cli.main(args=args, prog_name="parsicore", standalone_mode=False, obj=settings)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("parsicore: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"parsicore: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except ParsicoreError as e:
        click.echo(f"parsicore: error: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        click.echo("parsicore: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

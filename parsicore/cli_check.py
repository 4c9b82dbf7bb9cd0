"""``parsicore check``: compare a model with expected outputs, onnxruntime, or its embedded self-test."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from parsicore.cli import backend_option, load_model


@click.command(name="check")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Input array(s): .npy, or .npz by input name.")
@click.option("--expected", "expected_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Expected output(s): .npy, or .npz by output name (may add intermediate tensors by name).")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Compare with onnxruntime running this ONNX file on the same input.")
@click.option("--rtol", type=click.FloatRange(min=0.0), default=None,
              help="Tolerance relative to the output scale max|expected| (default 1e-4; 2e-2 for float16 weights).")
@click.option("--atol", type=click.FloatRange(min=0.0), default=1e-6, show_default=True,
              help="Absolute tolerance added to rtol * scale.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input for --onnx.")
@backend_option
def check(model_path: Path, input_path: Path | None, expected_path: Path | None, onnx_path: Path | None,
          rtol: float | None, atol: float, seed: int, backend: str | None) -> None:
    """Verify MODEL: against --expected outputs for --input, against onnxruntime (--onnx), or alone against
    its embedded self-test vector and weights checksum. Exit 0 pass, 1 mismatch, 2 bad input."""
    from parsicore import check as checks

    if expected_path is not None and onnx_path is not None:
        raise click.UsageError("give either --expected or --onnx, not both")
    if expected_path is not None and input_path is None:
        raise click.UsageError("--expected needs --input")
    if input_path is not None and expected_path is None and onnx_path is None:
        raise click.UsageError("--input needs --expected or --onnx")
    model = load_model(model_path, backend, None)
    inputs = checks.load_arrays(input_path) if input_path is not None else None
    if onnx_path is not None:
        report = checks.check_onnx(model, onnx_path, inputs, rtol, atol, seed)
    elif expected_path is not None:
        report = checks.check_expected(model, inputs or {}, checks.load_arrays(expected_path), rtol, atol,
                                       f"expected outputs {expected_path}")
    else:
        report = checks.check_selftest(model, rtol, atol)
    click.echo(f"model: {model_path} ({model.backend})")
    for line in checks.format_report(report):
        click.echo(line)
    if not report.passed:
        sys.exit(1)

"""``parsicore convert MODEL.onnx -o MODEL.h5``: import an ONNX model (optional extra ``onnx``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="convert")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The parsicore model file to write (.h5).")
@click.option("--float16", is_flag=True, help="Store the weights as float16 (half the size).")
@click.option("--name", default=None, help="Model name stored in the metadata (default: the file's stem).")
@click.option("--no-selftest", "no_selftest", is_flag=True,
              help="Do not embed (and verify) a self-test vector computed with onnxruntime.")
def convert(source: Path, output: Path, float16: bool, name: str | None, no_selftest: bool) -> None:
    """Convert SOURCE (an ONNX file, opset 11+) to the parsicore format; nothing is written on failure."""
    from parsicore.importers.onnx_import import save_onnx_as

    model_file = save_onnx_as(source, output, float16=float16, name=name, selftest=not no_selftest)
    gates = sum(1 for n in model_file.nodes if n.op in ("LKAMGate", "TopKGate"))
    params = sum(int(a.size) for arrays in model_file.weights.values() for a in arrays.values())
    click.echo(f"{source} -> {output}: {len(model_file.nodes)} nodes, {params:,} parameters, {gates} gate(s)"
               f"{', float16 weights' if float16 else ''}")
    if model_file.selftest_inputs:
        click.echo("self-test vector (onnxruntime) embedded and reproduced; verify on the board with "
                   f"`parsicore check {output}`")
    else:
        click.echo("no self-test vector embedded (onnxruntime unavailable or disabled)")

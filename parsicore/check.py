"""Consistency checks: does a parsicore model compute what its producer framework computed?

Three references a model can be compared with:

- an embedded self-test vector (``/selftest`` in the file: an input and the producer's outputs) plus the
  weights checksum in the metadata (:func:`check_selftest`), so a model copied to a board is verified
  there without any framework;
- arrays given by the user, ``.npy``/``.npz`` read without pickle (:func:`check_expected`);
- onnxruntime running the source ONNX file on the same input (:func:`check_onnx`).

Errors are measured per output against the reference's *output scale* ``max |expected|``: ``max_rel =
max_abs / scale``. An output passes when ``max_abs <= atol + rtol * scale``. When an output fails, the
intermediate tensors are compared in execution order and the first layer whose output diverges is
reported (:func:`first_divergence`); parsicore's captured tensors carry the producer's tensor names
(fx node names for the torch exporter, ONNX value names for the importer), so both sides line up.

Gated convs compute only the channels their mask keeps, so between a gated conv and its ChannelMask
parsicore holds zeros where the framework holds dense values; those tensors are compared on the kept
channels only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parsicore.errors import InputError

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6
#: Default relative tolerance for a model whose weights are stored as float16 (rounding moves outputs).
FLOAT16_RTOL = 2e-2
RANDOM_SEED = 0


@dataclass(frozen=True)
class OutputComparison:
    """One output against its reference. top1: (agreeing rows, rows) for (N, K>1) outputs, else None."""

    name: str
    max_abs: float
    max_rel: float
    scale: float
    top1: tuple[int, int] | None
    passed: bool


@dataclass(frozen=True)
class Divergence:
    """The first step whose output tensor differs from the reference beyond the tolerance."""

    node: str
    op: str
    tensor: str
    max_abs: float
    max_rel: float
    note: str = ""


@dataclass(frozen=True)
class CheckReport:
    """Result of a check. passed: every output within tolerance and the checksum (when checked) right."""

    reference: str
    input_description: str
    outputs: tuple[OutputComparison, ...]
    checksum_ok: bool | None = None
    divergence: Divergence | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and self.checksum_ok is not False


# ----------------------------------------------------------------------------------------------- arrays


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of a ``.npy`` (one array, key ``""``) or ``.npz`` file, read without pickle; InputError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, refused
        raise InputError(f"{p}: cannot read without pickle ({e})") from e
    except (OSError, EOFError) as e:
        raise InputError(f"{p}: not a .npy/.npz file ({e})") from e
    if isinstance(data, np.ndarray):
        return {"": data}
    try:
        with data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        raise InputError(f"{p}: cannot read without pickle ({e})") from e


def _as_float32(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} has dtype {arr.dtype}; expected real numbers")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{what} contains NaN or infinity")
    return out


def assign_arrays(arrays: Mapping[str, np.ndarray], names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """Match loaded arrays to ``names``: by name, or by position when the file holds unnamed/positional arrays."""
    if set(names) <= set(arrays):
        return {n: _as_float32(arrays[n], f"{what} {n!r}") for n in names}
    if len(arrays) == len(names):
        return {n: _as_float32(a, f"{what} {n!r}") for n, a in zip(names, arrays.values())}
    raise InputError(f"{what}: expected arrays named {list(names)}, the file holds {sorted(arrays)}")


def random_inputs(model: Any, batch: int = 1, seed: int = RANDOM_SEED) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs of the model's declared shapes (batch ``batch``), fixed seed."""
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal((batch, *t.shape[1:])).astype(np.float32) for t in model.inputs}


# ----------------------------------------------------------------------------------------------- comparing


def compare_output(name: str, actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> OutputComparison:
    """Max absolute / relative (to max |expected|) error and top-1 agreement of one output."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise InputError(f"output {name!r}: the model gives shape {actual.shape}, the reference {expected.shape}")
    diff = np.abs(actual - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    top1 = None
    if actual.ndim == 2 and actual.shape[1] > 1:
        agree = int((actual.argmax(axis=1) == expected.argmax(axis=1)).sum())
        top1 = (agree, actual.shape[0])
    return OutputComparison(name, max_abs, max_rel, scale, top1, max_abs <= atol + rtol * scale)


def masked_tensors(model: Any) -> dict[str, str]:
    """Tensor -> mask tensor, for tensors between a gated conv and its ChannelMask (kept channels only valid)."""
    steps = model.plan.steps
    producer = {t: s for s in steps for t in s.outputs}
    readers: dict[str, int] = {}
    for s in steps:
        for t in s.inputs:
            readers[t] = readers.get(t, 0) + 1
    out: dict[str, str] = {}
    for s in steps:
        if s.op_type != "ChannelMask":
            continue
        x, mask = s.inputs
        chain, t = [], x
        while t in producer and readers.get(t, 0) == 1:
            p = producer[t]
            chain.append(t)
            if p.is_conv:
                if p.gate_mask == mask:
                    out.update({c: mask for c in chain})
                break
            if len(p.inputs) != 1 or p.op_type == "ChannelMask":
                break
            t = p.inputs[0]
    return out


def _tensor_error(ours: np.ndarray, ref: np.ndarray, keep: np.ndarray | None) -> tuple[float, float, float]:
    """(max abs error, max rel error, scale) over the channels ``keep`` (N, C) marks, all when None."""
    a = np.asarray(ours, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if keep is not None:
        w = keep.reshape(keep.shape + (1,) * (a.ndim - 2)).astype(np.float64)
        a, r = a * w, r * w
    diff = np.abs(a - r)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))), scale


def first_divergence(model: Any, captured: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                     rtol: float, atol: float) -> Divergence | None:
    """The first plan step (execution order) whose output differs from ``reference`` beyond the tolerance.

    captured: every tensor of a parsicore run (``run_with_stats(capture=True)``); reference: the
    producer's tensors by the same names (tensors missing from it are skipped).
    """
    masked = masked_tensors(model)
    for step in model.plan.steps:
        for t in step.outputs:
            if t not in reference or t not in captured:
                continue
            ours, ref = captured[t], np.asarray(reference[t])
            if ours.shape != ref.shape:
                if ours.size == ref.size:
                    ref = ref.reshape(ours.shape)
                else:
                    return Divergence(step.name, step.op_type, t, float("inf"), float("inf"),
                                      f"shape {ours.shape} vs reference {ref.shape}")
            keep = None
            if t in masked and masked[t] in captured:
                keep = captured[masked[t]] != 0
            max_abs, max_rel, scale = _tensor_error(ours, ref, keep)
            if max_abs > atol + rtol * scale:
                note = ""
                if step.is_gate:
                    note = "a gate switched differently (a switch close to its threshold, or a conversion bug)"
                return Divergence(step.name, step.op_type, t, max_abs, max_rel, note)
    return None


def compare(model: Any, inputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], rtol: float,
            atol: float, reference_tensors: Mapping[str, np.ndarray] | None = None) -> tuple[
        list[OutputComparison], Divergence | None]:
    """Run ``model`` on ``inputs`` and compare its outputs with ``expected`` (by output name, in order).

    When an output fails and ``reference_tensors`` (intermediate tensors by name) are given, the first
    diverging layer is located.
    """
    captured, _ = model.run_with_stats(dict(inputs), capture=True)
    names = [t.name for t in model.outputs]
    results = [compare_output(n, captured[n], expected[n], rtol, atol) for n in names]
    divergence = None
    if not all(r.passed for r in results) and reference_tensors:
        ref = dict(expected)
        ref.update(reference_tensors)
        divergence = first_divergence(model, captured, ref, rtol, atol)
    return results, divergence


# ----------------------------------------------------------------------------------------------- checks


def _default_rtol(model: Any, rtol: float | None) -> tuple[float, list[str]]:
    if rtol is not None:
        return rtol, []
    if model.model_file.float16_weights:
        return FLOAT16_RTOL, [f"weights stored as float16: default tolerance rtol={FLOAT16_RTOL:g}"]
    return DEFAULT_RTOL, []


def _describe(inputs: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())


def _check_input_shapes(model: Any, inputs: Mapping[str, np.ndarray]) -> None:
    for spec in model.inputs:
        arr = inputs[spec.name]
        if arr.ndim != len(spec.shape) or tuple(arr.shape[1:]) != tuple(spec.shape[1:]) or arr.shape[0] < 1:
            want = "(N, " + ", ".join(str(d) for d in spec.shape[1:]) + ")"
            raise InputError(f"input {spec.name!r} must have shape {want}, got {tuple(arr.shape)}")


def check_selftest(model: Any, rtol: float | None = None, atol: float = DEFAULT_ATOL) -> CheckReport:
    """Verify the weights checksum and re-run the embedded self-test vector. InputError when neither exists."""
    from parsicore.checksum import weights_sha256

    mf = model.model_file
    stored = mf.metadata.get("weights_sha256")
    checksum_ok = None if not stored else (weights_sha256(mf) == stored)
    rtol, notes = _default_rtol(model, rtol)
    if not mf.selftest_inputs or not mf.selftest_outputs:
        if checksum_ok is None:
            raise InputError(f"{mf.source}: holds neither a self-test vector nor a weights checksum; "
                             "give --input/--expected or --onnx")
        notes.append("no self-test vector embedded: only the checksum was verified")
        return CheckReport("weights checksum", "-", (), checksum_ok, None, tuple(notes))
    if checksum_ok is None:
        notes.append("no weights checksum stored")
    inputs = assign_arrays(mf.selftest_inputs, [t.name for t in model.inputs], "self-test input")
    _check_input_shapes(model, inputs)
    expected = assign_arrays(mf.selftest_outputs, [t.name for t in model.outputs], "self-test output")
    results, divergence = compare(model, inputs, expected, rtol, atol)
    if not all(r.passed for r in results):
        notes.append("the self-test vector holds outputs only: compare with the source framework (e.g. --onnx) "
                     "to locate the diverging layer")
    producer = mf.metadata.get("producer") or "the producer"
    return CheckReport(f"embedded self-test vector ({producer})", _describe(inputs), tuple(results), checksum_ok,
                       divergence, tuple(notes))


def check_expected(model: Any, inputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                   rtol: float | None = None, atol: float = DEFAULT_ATOL, description: str = "") -> CheckReport:
    """Compare with user-given expected outputs. Extra arrays in ``expected`` named like model tensors
    are used as intermediate references to locate the first diverging layer."""
    rtol, notes = _default_rtol(model, rtol)
    ins = assign_arrays(inputs, [t.name for t in model.inputs], "input")
    _check_input_shapes(model, ins)
    out_names = [t.name for t in model.outputs]
    if set(out_names) <= set(expected):
        exp = {n: _as_float32(expected[n], f"expected {n!r}") for n in out_names}
        extra = {k: v for k, v in expected.items() if k not in exp}
    else:
        exp = assign_arrays(expected, out_names, "expected output")
        extra = {}
    results, divergence = compare(model, ins, exp, rtol, atol, extra)
    if not divergence and not all(r.passed for r in results) and not extra:
        notes.append("intermediate tensors are unknown for .npy references: use --onnx, or an .npz holding "
                     "tensors named like the model's, to locate the diverging layer")
    return CheckReport(description or "expected outputs", _describe(ins), tuple(results), None, divergence,
                       tuple(notes))


def _onnx_session(model_proto: Any) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise InputError("--onnx needs onnxruntime (pip install onnxruntime)") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot load the ONNX model: {str(e).splitlines()[0]}") from e


def onnx_graph_inputs(model_proto: Any) -> list[Any]:
    """The ONNX graph's real inputs (initializers listed as inputs are left out)."""
    inits = {i.name for i in model_proto.graph.initializer}
    return [i for i in model_proto.graph.input if i.name not in inits]


def onnx_static_batch(model_proto: Any) -> int:
    """The first input's batch dimension when fixed in the file, else 1."""
    inputs = onnx_graph_inputs(model_proto)
    if inputs:
        dims = inputs[0].type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return 1


def run_onnxruntime(model_proto: Any, inputs: Sequence[np.ndarray], extra_outputs: Sequence[str] = ()) -> dict[
        str, np.ndarray]:
    """Run onnxruntime on positional inputs; returns graph outputs (and ``extra_outputs``) by name."""
    import onnx

    proto = model_proto
    if extra_outputs:
        proto = onnx.ModelProto()
        proto.CopyFrom(model_proto)
        have = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in have:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = _onnx_session(proto)
    names = [i.name for i in onnx_graph_inputs(proto)]  # initializers listed as inputs keep their values
    if len(names) != len(inputs):
        raise InputError(f"the ONNX model takes {len(names)} input(s), the parsicore model {len(inputs)}")
    try:
        values = session.run(None, dict(zip(names, inputs)))
    except Exception as e:
        raise InputError(f"onnxruntime failed on this input: {' '.join(str(e).split())[:300]}") from e
    return {o.name: v for o, v in zip(session.get_outputs(), values)}


def check_onnx(model: Any, onnx_path: str | os.PathLike[str] | Any, inputs: Mapping[str, np.ndarray] | None = None,
               rtol: float | None = None, atol: float = DEFAULT_ATOL, seed: int = RANDOM_SEED) -> CheckReport:
    """Compare with onnxruntime on the source ONNX model (random input of the declared shape when None)."""
    try:
        import onnx
    except ImportError as e:
        raise InputError("--onnx needs the onnx package (pip install onnx onnxruntime)") from e
    if isinstance(onnx_path, onnx.ModelProto):
        proto, label = onnx_path, "<onnx model>"
    else:
        label = str(onnx_path)
        if not Path(onnx_path).is_file():
            raise InputError(f"{onnx_path}: no such ONNX file")
        try:
            proto = onnx.load(str(onnx_path))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{onnx_path}: not a readable ONNX file ({first})") from e
    rtol, notes = _default_rtol(model, rtol)
    names = [t.name for t in model.inputs]
    if inputs is None:
        ins = random_inputs(model, onnx_static_batch(proto), seed)
        description = f"random normal {_describe(ins)}, seed {seed}"
    else:
        ins = assign_arrays(inputs, names, "input")
        description = _describe(ins)
    _check_input_shapes(model, ins)
    ordered = [ins[n] for n in names]
    ort_out = run_onnxruntime(proto, ordered)
    out_names = [t.name for t in model.outputs]
    onnx_outputs = [o.name for o in proto.graph.output]
    if len(onnx_outputs) != len(out_names):
        raise InputError(f"the ONNX model has {len(onnx_outputs)} output(s), the parsicore model {len(out_names)}")
    captured, _ = model.run_with_stats(ins, capture=True)
    results = [compare_output(n, captured[n], ort_out[o], rtol, atol) for n, o in zip(out_names, onnx_outputs)]
    divergence = None
    if not all(r.passed for r in results):
        values = {o for node in proto.graph.node for o in node.output}
        wanted = [t for t in captured if t in values and t not in onnx_outputs]
        reference = run_onnxruntime(proto, ordered, wanted)
        reference.update({n: ort_out[o] for n, o in zip(out_names, onnx_outputs)})
        divergence = first_divergence(model, captured, reference, rtol, atol)
    return CheckReport(f"onnxruntime on {label}", description, tuple(results), None, divergence, tuple(notes))


# ----------------------------------------------------------------------------------------------- printing


def format_report(report: CheckReport) -> list[str]:
    """Human-readable lines, ending with PASS or FAIL."""
    lines = [f"reference: {report.reference}", f"input: {report.input_description}"]
    for o in report.outputs:
        top = "" if o.top1 is None else f"  top-1 agree {o.top1[0]}/{o.top1[1]}"
        lines.append(f"output {o.name}: max abs {o.max_abs:.3g}  max rel {o.max_rel:.3g} (scale {o.scale:.4g})"
                     f"{top}  {'PASS' if o.passed else 'FAIL'}")
    if report.checksum_ok is not None:
        lines.append(f"weights checksum: {'OK' if report.checksum_ok else 'MISMATCH (the weights were modified)'}")
    if report.divergence is not None:
        d = report.divergence
        extra = f" ({d.note})" if d.note else ""
        lines.append(f"first diverging layer: {d.node} ({d.op}), tensor {d.tensor}: max abs {d.max_abs:.3g}, "
                     f"max rel {d.max_rel:.3g}{extra}")
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append("PASS" if report.passed else "FAIL")
    return lines

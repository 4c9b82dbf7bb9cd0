"""ONNX -> parsicore importer: ``import_onnx(path_or_model) -> ModelFile`` (opset 11 and newer).

onnx (and, for the self-test vector, onnxruntime) are imported inside the functions only.

How a graph is converted:

1. Model-local functions are inlined; calls of gate functions keep their boundary
   (:mod:`parsicore.importers.onnx_graph`).
2. Every node whose inputs are all constants is folded at import time with ``onnx.reference`` (the
   shape arithmetic exporters emit around Flatten/Reshape: Shape, Gather, Unsqueeze, Concat, Constant,
   ConstantOfShape, Cast...). ``Shape`` of a tensor computed at run time folds to its static shape, the
   batch dimension being the one declared in the file (1 when dynamic).
3. Gates are recognised (:mod:`parsicore.importers.onnx_gates`, FORMAT.md "ONNX gate convention"), and
   ``Mul(y, mask viewed as (N, K, 1, 1))`` with a gate's mask becomes ``ChannelMask``.
4. Every other node maps to parsicore ops; anything unsupported is collected and reported at once as a
   ConversionError listing each op type with node names, before anything is written.

Names: parsicore node names are ONNX node names sanitised to the format's NAME_RE (``/layer1/conv1/Conv``
becomes ``layer1.conv1.Conv``); tensor names are kept, so ``parsicore check --onnx`` can ask onnxruntime
for the same intermediate tensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parsicore.builder import ModelBuilder
from parsicore.errors import ConversionError, ParsicoreError
from parsicore.format import NAME_RE, ModelFile
from parsicore.importers.onnx_gates import GateMatch, find_gates, gate_function_op
from parsicore.importers.onnx_graph import (
    MAX_FOLDED_ELEMENTS,
    GraphView,
    OnnxNode,
    flatten_graph,
    gemm_weight_bias,
    same_pads,
)

MIN_OPSET = 11
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-6
_FLOAT_MAX = float(np.finfo(np.float32).max)
_ALIASES = ("Identity", "Dropout")
_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "HardSwish")
_BINARY = ("Add", "Mul", "Sub", "Div")
#: Ops never folded even with constant inputs (random numbers).
_NO_FOLD = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


class _Unsupported(Exception):
    """One node cannot be converted (op type known to be unsupported, or unsupported attributes)."""

    def __init__(self, node: OnnxNode, why: str = "") -> None:
        super().__init__(why)
        self.node = node
        self.why = why


def sanitise_name(name: str) -> str:
    """An ONNX name as a NAME_RE-valid parsicore node name: '/' becomes '.', other invalid characters '_'."""
    s = name.replace("/", ".").strip(".")
    s = re.sub(r"\.{2,}", ".", s)
    s = "".join(c if NAME_RE.match(c) else "_" for c in s)[:190]
    return s if s and s not in (".", "..") else "node"


def import_onnx(path_or_model: str | os.PathLike[str] | Any, name: str | None = None, selftest: bool = True,
                seed: int = 0) -> ModelFile:
    """Convert an ONNX model (path or ``onnx.ModelProto``) to a parsicore ModelFile.

    selftest: when onnxruntime is installed, embed a self-test vector (a random standard-normal input of
    the declared shape, fixed ``seed``, and onnxruntime's outputs for it) and verify that parsicore
    reproduces it (ConversionError naming the first diverging layer otherwise).
    Raises ConversionError listing every unsupported op type with node names.
    """
    try:
        import onnx
    except ImportError as e:
        raise ConversionError("importing ONNX models needs the onnx package (pip install onnx)") from e
    if isinstance(path_or_model, onnx.ModelProto):
        model, label = path_or_model, name or path_or_model.graph.name or "onnx-model"
    else:
        p = Path(path_or_model)
        if not p.is_file():
            raise ConversionError(f"{p}: no such ONNX file")
        try:
            model = onnx.load(str(p))
        except Exception as e:  # protobuf decode errors and friends
            raise ConversionError(f"{p}: not a readable ONNX model ({_first_line(e)})") from e
        label = name or p.stem
    converter = _Importer(onnx, model, label)
    model_file = converter.convert()
    if selftest:
        _embed_selftest(model_file, model, converter, label, seed)
    return model_file


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _embed_selftest(model_file: ModelFile, proto: Any, converter: _Importer, label: str, seed: int) -> None:
    """Run onnxruntime on a random input, store it as the self-test vector, and verify parsicore against it."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    from parsicore.api import load
    from parsicore.check import check_onnx, random_inputs, run_onnxruntime
    from parsicore.checksum import weights_sha256
    from parsicore.errors import InputError

    model = load(model_file, backend="numpy")
    inputs = random_inputs(model, converter.batch, seed)
    try:
        outputs = run_onnxruntime(proto, [inputs[t.name] for t in model.inputs])
    except InputError:
        return  # e.g. custom-domain gate nodes without function bodies: onnxruntime cannot run the file
    model_file.selftest_inputs = inputs
    model_file.selftest_outputs = {ours: outputs[theirs] for ours, theirs in zip(model_file.outputs,
                                                                                  converter.onnx_outputs)}
    model_file.metadata["weights_sha256"] = weights_sha256(model_file)
    report = check_onnx(model, proto, inputs, VERIFY_RTOL, VERIFY_ATOL)
    if not report.passed:
        bad = next(o for o in report.outputs if not o.passed)
        where = ""
        if report.divergence is not None:
            d = report.divergence
            where = f"; first diverging layer {d.node} ({d.op}), max rel error {d.max_rel:.3g}"
            where += f" ({d.note})" if d.note else ""
        raise ConversionError(f"{label}: parsicore's output {bad.name!r} differs from onnxruntime's "
                              f"(max rel error {bad.max_rel:.3g}){where}")


def save_onnx_as(path_or_model: str | os.PathLike[str] | Any, target: str | os.PathLike[str],
                 float16: bool = False, name: str | None = None, selftest: bool = True) -> ModelFile:
    """import_onnx + atomic write to ``target`` (nothing is written when conversion fails)."""
    from parsicore.format import write_model

    model_file = import_onnx(path_or_model, name=name, selftest=selftest)
    if float16:
        from parsicore.checksum import weights_sha256

        for arrays in model_file.weights.values():
            for key in arrays:
                arrays[key] = arrays[key].astype(np.float16).astype(np.float32)
        model_file.metadata["weights_sha256"] = weights_sha256(model_file)
    try:
        write_model(model_file, target, float16=float16)
    except ParsicoreError as e:
        raise ConversionError(str(e)) from e
    return model_file


# ----------------------------------------------------------------------------------------------- converter


class _Importer:
    def __init__(self, onnx: Any, model: Any, label: str) -> None:
        self.onnx = onnx
        self.model = model
        self.label = label
        self.opset = 0
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)
        self.b = ModelBuilder(label, description=model.doc_string or "",
                              producer=f"parsicore.importers.onnx_import from {model.producer_name or 'unknown'} "
                                       f"{model.producer_version or ''}".strip())
        self.const: dict[str, np.ndarray] = {}
        self.tensor: dict[str, str] = {}  # ONNX tensor -> parsicore tensor (computed at run time)
        self.shape: dict[str, tuple[int, ...]] = {}  # parsicore tensor -> full shape, batch first
        self.pending: dict[str, tuple[str, tuple[int, ...]]] = {}  # (N, C) viewed as (N, C, 1, ...): lazily
        self.gate_tensors: set[str] = set()
        self.node_names: dict[str, int] = {}
        self.unsupported: dict[str, list[str]] = {}
        self.problems: list[str] = []
        self.batch = 1
        self.onnx_outputs: list[str] = []
        self._onnx_inputs: list[str] = []
        self.view: GraphView | None = None

    # ------------------------------------------------------------------ driver
    def convert(self) -> ModelFile:
        onnx = self.onnx
        if self.opset < MIN_OPSET:
            raise ConversionError(f"{self.label}: ONNX opset {self.opset or 'unknown'} is not supported "
                                  f"(opset {MIN_OPSET} or newer)")
        for init in self.model.graph.initializer:
            self.const[init.name] = onnx.numpy_helper.to_array(init)
        self._declare_inputs()
        nodes = flatten_graph(onnx, self.model, gate_function_op)
        self._prefold(nodes)
        self.onnx_outputs = [o.name for o in self.model.graph.output]
        view = GraphView(nodes, self.const, self.onnx_outputs)
        matches, gate_problems = find_gates(view)
        self.problems += gate_problems
        gate_at = {m.last.index: m for m in matches}
        claimed = {n.index for m in matches for n in m.nodes}
        self.view = view
        for node in nodes:
            if node.index in gate_at:
                self._gate(gate_at[node.index])
                continue
            if node.index in claimed or all(t in self.const for t in node.outputs if t):
                continue
            if any(t and t not in self.const and t not in self.tensor and t not in self.pending
                   for t in node.inputs):
                # An input failed to convert (reported there); list this node too if its op type is unknown.
                if not self._known(node):
                    self._unsupported_op(node)
                continue
            try:
                self._convert(node)
            except _Unsupported as e:
                if e.why:
                    self.problems.append(f"{e.node.label}: {e.why}")
                else:
                    self._unsupported_op(e.node)
        for out in self.onnx_outputs:
            if out in self.tensor or out in self.pending:
                self.b.add_output(self._tensor(out))
            elif not self.problems and not self.unsupported:
                self.problems.append(f"graph output {out!r} is not computed from the inputs")
        if self.unsupported or self.problems:
            parts = [f"{op} (node{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names[:5])}"
                     f"{', ...' if len(names) > 5 else ''})" for op, names in sorted(self.unsupported.items())]
            msg = f"{self.label}: cannot convert"
            if parts:
                msg += f"; unsupported op type(s): {', '.join(parts)}"
            if self.problems:
                msg += f"; {'; '.join(self.problems)}"
            raise ConversionError(msg)
        self.b.set_metadata(onnx={"opset": self.opset, "inputs": list(self._onnx_inputs),
                                  "outputs": self.onnx_outputs})
        model_file = self.b.build()
        try:
            from parsicore.graph import Graph

            Graph.from_model_file(model_file)
        except ParsicoreError as e:
            raise ConversionError(f"{self.label}: the converted graph is invalid: {e}") from e
        return model_file

    def _used(self, tensor: str) -> bool:
        return tensor in self.onnx_outputs or bool(self.view and self.view.users(tensor))

    def _unsupported_op(self, node: OnnxNode) -> None:
        op = node.op if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op}"
        self.unsupported.setdefault(op, []).append(node.name)

    def _known(self, node: OnnxNode) -> bool:
        if node.domain == "ai.parsicore":
            return node.op in ("LKAMGate", "TopKGate", "ChannelMask")
        return node.domain in ("", "ai.onnx") and hasattr(self, f"_op_{node.op}")

    def _declare_inputs(self) -> None:
        inits = set(self.const)
        for i, vi in enumerate(x for x in self.model.graph.input if x.name not in inits):
            tt = vi.type.tensor_type
            if tt.elem_type not in (self.onnx.TensorProto.FLOAT, self.onnx.TensorProto.FLOAT16,
                                    self.onnx.TensorProto.DOUBLE):
                raise ConversionError(f"{self.label}: input {vi.name!r} is not a float tensor")
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if not 2 <= len(dims) <= 4 or any(d is None or d < 1 for d in dims[1:]):
                raise ConversionError(f"{self.label}: input {vi.name!r} has shape {dims}; parsicore needs rank "
                                      "2 to 4 with fixed sizes after the batch dimension")
            if i == 0 and dims[0]:
                self.batch = int(dims[0])
            name = sanitise_name(vi.name)
            self.b.add_input(name, (None, *dims[1:]))
            self.tensor[vi.name] = name
            self.shape[name] = (self.batch, *[int(d) for d in dims[1:]])  # type: ignore[misc]
            self._onnx_inputs.append(vi.name)

    # ------------------------------------------------------------------ constants
    def _prefold(self, nodes: list[OnnxNode]) -> None:
        """Fold every node computable from initializers/Constants alone (before gates are matched)."""
        for node in nodes:
            if node.op in _NO_FOLD or node.domain not in ("", "ai.onnx"):
                continue
            if all((not t) or t in self.const for t in node.inputs):
                self._fold(node)

    def _fold(self, node: OnnxNode) -> bool:
        from onnx.reference import ReferenceEvaluator

        onnx = self.onnx
        feeds = {t: self.const[t] for t in node.inputs if t}
        # A one-node model, so the node runs with this file's opset (a bare NodeProto gets the newest).
        inputs = [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                  for t, v in feeds.items()]
        outputs = [onnx.helper.make_empty_tensor_value_info(t) for t in node.outputs if t]
        graph = onnx.helper.make_graph([node.proto], "fold", inputs, outputs)
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        try:
            results = ReferenceEvaluator(proto).run(None, feeds)
        except Exception:  # an op onnx.reference cannot evaluate: left for conversion (and reported there)
            return False
        for t, v in zip(node.outputs, results):
            if t and v is not None:
                arr = np.asarray(v)
                if arr.size > MAX_FOLDED_ELEMENTS:
                    return False
                self.const[t] = arr
        return True

    def _c(self, node: OnnxNode, i: int, what: str) -> np.ndarray | None:
        """Constant input i of ``node`` (None when absent); _Unsupported when it is computed at run time."""
        if i >= len(node.inputs) or not node.inputs[i]:
            return None
        t = node.inputs[i]
        if t not in self.const:
            raise _Unsupported(node, f"{what} must be a constant")
        return self.const[t]

    # ------------------------------------------------------------------ tensors
    def _is_runtime(self, t: str) -> bool:
        return t in self.tensor or t in self.pending

    def _tensor(self, t: str) -> str:
        if t in self.tensor:
            return self.tensor[t]
        root, shape = self.pending[t]
        out = self._add("Reshape", [self.tensor[root]], t, f"{sanitise_name(t)}:view", {"shape": list(shape[1:])})
        return out

    def _x(self, node: OnnxNode, ranks: Sequence[int] = ()) -> str:
        t = node.inputs[0]
        if not self._is_runtime(t):
            raise _Unsupported(node, "its input is not computed from the model input")
        name = self._tensor(t)
        if ranks and len(self.shape[name]) not in ranks:
            expected = " or ".join(map(str, ranks))
            raise _Unsupported(node, f"input of shape {self.shape[name]} (expected rank {expected})")
        return name

    def _unique(self, name: str) -> str:
        count = self.node_names.get(name, 0) + 1
        self.node_names[name] = count
        return name if count == 1 else f"{name}#{count}"

    def _add(self, op: str, inputs: Sequence[str], out: str, name: str, attrs: Mapping[str, Any] | None = None,
             weights: Mapping[str, np.ndarray | None] | None = None) -> str:
        """Emit one parsicore node writing tensor ``out``; its shape is inferred with the op's own rule."""
        from parsicore.ops import OPS
        from parsicore.ops.base import parse_attrs

        attrs = dict(attrs or {})
        w = {k: np.asarray(v, dtype=np.float32) for k, v in (weights or {}).items() if v is not None}
        op_def = OPS[op]
        in_shapes = [self.shape[t][1:] for t in inputs]
        try:
            parsed = parse_attrs(op_def.attrs, attrs)
            (feature,) = op_def.infer(parsed, in_shapes, {k: v.shape for k, v in w.items()})
        except ValueError as e:
            raise ConversionError(f"{self.label}: node {name!r} ({op}): {e}") from e
        node_name = self._unique(name)
        self.b.add_node(op, list(inputs), [out], name=node_name, attrs=attrs, weights=w)
        self.shape[out] = (self.batch, *[int(d) for d in feature])
        self.tensor[out] = out
        return out

    def _emit(self, node: OnnxNode, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None,
              weights: Mapping[str, np.ndarray | None] | None = None) -> str:
        return self._add(op, inputs, node.outputs[0], sanitise_name(node.name), attrs, weights)

    def _alias(self, node: OnnxNode, src: str) -> None:
        if src in self.pending:
            self.pending[node.outputs[0]] = self.pending[src]
        else:
            self.tensor[node.outputs[0]] = self.tensor[src]

    def _runtime_shape(self, t: str) -> tuple[int, ...]:
        if t in self.pending:
            return self.pending[t][1]
        return self.shape[self.tensor[t]]

    # ------------------------------------------------------------------ dispatch
    def _convert(self, node: OnnxNode) -> None:
        if all((not t) or t in self.const for t in node.inputs):
            if node.op not in _NO_FOLD and node.domain in ("", "ai.onnx") and self._fold(node):
                return
            raise _Unsupported(node)
        if node.domain == "ai.parsicore":
            self._explicit_gate(node)
            return
        if node.domain not in ("", "ai.onnx"):
            raise _Unsupported(node)
        handler = getattr(self, f"_op_{node.op}", None)
        if handler is None:
            raise _Unsupported(node)
        handler(node)

    # ------------------------------------------------------------------ simple ops
    def _op_Shape(self, node: OnnxNode) -> None:
        shape = np.array(self._runtime_shape(node.inputs[0]), dtype=np.int64)
        start, end = node.attr("start", 0), node.attr("end")
        self.const[node.outputs[0]] = shape[start:end]

    def _op_Size(self, node: OnnxNode) -> None:
        self.const[node.outputs[0]] = np.array(int(np.prod(self._runtime_shape(node.inputs[0]))), dtype=np.int64)

    def _op_Identity(self, node: OnnxNode) -> None:
        self._alias(node, node.inputs[0])

    def _op_Dropout(self, node: OnnxNode) -> None:
        if len(node.outputs) > 1 and node.outputs[1] and self._used(node.outputs[1]):
            raise _Unsupported(node, "its mask output is used")
        training = self._c(node, 2, "training_mode")
        if training is not None and bool(training.reshape(())):
            raise _Unsupported(node, "training_mode is true")
        self._alias(node, node.inputs[0])

    def _op_Cast(self, node: OnnxNode) -> None:
        if node.attr("to") not in (self.onnx.TensorProto.FLOAT, self.onnx.TensorProto.FLOAT16,
                                   self.onnx.TensorProto.DOUBLE):
            raise _Unsupported(node, f"cast of a run-time tensor to type {node.attr('to')}")
        self._alias(node, node.inputs[0])

    def _activation(self, node: OnnxNode, op: str, attrs: Mapping[str, Any] | None = None) -> None:
        self._emit(node, op, [self._x(node)], attrs)

    def _op_Relu(self, node: OnnxNode) -> None:
        self._activation(node, "Relu")

    def _op_Sigmoid(self, node: OnnxNode) -> None:
        self._activation(node, "Sigmoid")

    def _op_Tanh(self, node: OnnxNode) -> None:
        self._activation(node, "Tanh")

    def _op_HardSwish(self, node: OnnxNode) -> None:
        self._activation(node, "HardSwish")

    def _op_LeakyRelu(self, node: OnnxNode) -> None:
        self._activation(node, "LeakyRelu", {"alpha": float(node.attr("alpha", 0.01))})

    def _op_HardSigmoid(self, node: OnnxNode) -> None:
        self._activation(node, "HardSigmoid", {"alpha": float(node.attr("alpha", 0.2)),
                                               "beta": float(node.attr("beta", 0.5))})

    def _op_Clip(self, node: OnnxNode) -> None:
        lo_c, hi_c = self._c(node, 1, "min"), self._c(node, 2, "max")
        lo = float(lo_c.reshape(())) if lo_c is not None else float(node.attr("min", -_FLOAT_MAX))
        hi = float(hi_c.reshape(())) if hi_c is not None else float(node.attr("max", _FLOAT_MAX))
        self._activation(node, "Clip", {"lo": max(lo, -_FLOAT_MAX), "hi": min(hi, _FLOAT_MAX)})

    def _op_Softmax(self, node: OnnxNode) -> None:
        x = self._x(node)
        rank = len(self.shape[x])
        axis = int(node.attr("axis", 1 if self.opset < 13 else -1))
        if self.opset < 13 and rank > 2 and axis % rank != rank - 1:
            raise _Unsupported(node, f"opset {self.opset} Softmax on axis {axis} of a rank-{rank} tensor "
                                     "(flattens the trailing axes)")
        self._emit(node, "Softmax", [x], {"axis": axis})

    # ------------------------------------------------------------------ layers
    def _window(self, node: OnnxNode, x: str, kernel: tuple[int, int]) -> tuple[list[int], list[int], list[int]]:
        """strides, dilations and (top, left, bottom, right) pads of a Conv/pool node, auto_pad resolved."""
        strides = [int(s) for s in node.attr("strides", [1, 1])]
        dilations = [int(d) for d in node.attr("dilations", [1, 1])]
        auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = self.shape[x][2:]
            pads = same_pads((size[0], size[1]), kernel, (strides[0], strides[1]), (dilations[0], dilations[1]),
                             auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        elif auto_pad == "NOTSET":
            pads = [int(p) for p in node.attr("pads", [0, 0, 0, 0])]
        else:
            raise _Unsupported(node, f"auto_pad={auto_pad!r}")
        if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
            raise _Unsupported(node, "only 2-D windows")
        return strides, dilations, pads

    def _op_Conv(self, node: OnnxNode) -> None:
        x = self._x(node, (4,))
        w = self._c(node, 1, "the weight")
        bias = self._c(node, 2, "the bias")
        if w is None or w.ndim != 4:
            raise _Unsupported(node, "only 2-D convolution (weight (K, C/g, kh, kw))")
        kernel = (int(w.shape[2]), int(w.shape[3]))
        strides, dilations, pads = self._window(node, x, kernel)
        attrs = {"stride": strides, "pads": pads, "dilation": dilations, "groups": int(node.attr("group", 1)),
                 "kernel": list(kernel)}
        self._emit(node, "Conv", [x], attrs, {"weight": w, "bias": bias})

    def _op_BatchNormalization(self, node: OnnxNode) -> None:
        if any(t and self._used(t) for t in node.outputs[1:]) or node.attr("training_mode", 0):
            raise _Unsupported(node, "training mode (running statistics outputs)")
        x = self._x(node, (2, 4))
        scale, bias, mean, var = (self._c(node, i, n) for i, n in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
        self._emit(node, "BatchNorm", [x], {"epsilon": float(node.attr("epsilon", 1e-5))},
                   {"scale": scale, "bias": bias, "mean": mean, "var": var})

    def _pool(self, node: OnnxNode, op: str) -> None:
        x = self._x(node, (4,))
        kernel = tuple(int(k) for k in node.attr("kernel_shape", []))
        if len(kernel) != 2:
            raise _Unsupported(node, "only 2-D pooling")
        strides, dilations, pads = self._window(node, x, (kernel[0], kernel[1]))
        if dilations != [1, 1]:
            raise _Unsupported(node, f"dilations={dilations}")
        if len(node.outputs) > 1 and node.outputs[1] and self._used(node.outputs[1]):
            raise _Unsupported(node, "its indices output is used")
        attrs: dict[str, Any] = {"kernel": list(kernel), "stride": strides, "pads": pads,
                                 "ceil_mode": bool(node.attr("ceil_mode", 0))}
        if op == "AveragePool":
            attrs["count_include_pad"] = bool(node.attr("count_include_pad", 0))
        self._emit(node, op, [x], attrs)

    def _op_MaxPool(self, node: OnnxNode) -> None:
        self._pool(node, "MaxPool")

    def _op_AveragePool(self, node: OnnxNode) -> None:
        self._pool(node, "AveragePool")

    def _op_GlobalAveragePool(self, node: OnnxNode) -> None:
        self._emit(node, "GlobalAveragePool", [self._x(node, (4,))])

    def _op_GlobalMaxPool(self, node: OnnxNode) -> None:
        self._emit(node, "GlobalMaxPool", [self._x(node, (4,))])

    def _reduce(self, node: OnnxNode, op: str) -> None:
        x = self._x(node, (4,))
        axes = node.attr("axes")
        if axes is None and len(node.inputs) > 1:
            c = self._c(node, 1, "axes")
            axes = None if c is None else [int(a) for a in c.reshape(-1)]
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            raise _Unsupported(node, f"reduction over axes {axes} (only the spatial axes 2, 3)")
        if node.attr("keepdims", 1):
            self._emit(node, op, [x])
            return
        base = sanitise_name(node.name)
        pooled = self._add(op, [x], f"{node.outputs[0]}:pool", base)
        self._add("Flatten", [pooled], node.outputs[0], f"{base}:flatten", {"axis": 1})

    def _op_ReduceMean(self, node: OnnxNode) -> None:
        self._reduce(node, "GlobalAveragePool")

    def _op_ReduceMax(self, node: OnnxNode) -> None:
        self._reduce(node, "GlobalMaxPool")

    def _op_Gemm(self, node: OnnxNode) -> None:
        if node.attr("transA", 0):
            raise _Unsupported(node, "transA=1")
        x = self._x(node, (2,))
        b = self._c(node, 1, "B")
        c = self._c(node, 2, "C")
        if b is None or b.ndim != 2:
            raise _Unsupported(node, "B must be a 2-D constant")
        try:
            weight, bias = gemm_weight_bias(b, c, float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0)),
                                            int(node.attr("transB", 0)))
        except ValueError as e:
            raise _Unsupported(node, str(e)) from e
        self._emit(node, "Gemm", [x], weights={"weight": weight, "bias": bias})

    def _op_MatMul(self, node: OnnxNode) -> None:
        x = self._x(node, (2,))
        w = self._c(node, 1, "the second operand")
        if w is None or w.ndim != 2:
            raise _Unsupported(node, "the second operand must be a 2-D constant")
        self._emit(node, "Gemm", [x], weights={"weight": w.T})

    def _op_Concat(self, node: OnnxNode) -> None:
        if not all(self._is_runtime(t) for t in node.inputs):
            raise _Unsupported(node, "concatenates a constant with run-time tensors")
        parts = [self._tensor(t) for t in node.inputs]
        rank = len(self.shape[parts[0]])
        if int(node.attr("axis", 0)) % rank != 1:
            raise _Unsupported(node, f"axis {node.attr('axis')} (only the channel axis 1)")
        self._emit(node, "Concat", parts, {"axis": 1})

    def _op_Pad(self, node: OnnxNode) -> None:
        mode = node.attr("mode", "constant")
        if mode != "constant":
            raise _Unsupported(node, f"mode={mode!r} (only 'constant')")
        x = self._x(node, (4,))
        pads_c = self._c(node, 1, "pads")
        pads = [int(p) for p in (pads_c.reshape(-1) if pads_c is not None else node.attr("pads", []))]
        value_c = self._c(node, 2, "constant_value")
        value = float(value_c.reshape(())) if value_c is not None and value_c.size else float(node.attr("value", 0.0))
        axes_c = self._c(node, 3, "axes")
        full = [0] * 8
        axes = [int(a) % 4 for a in axes_c.reshape(-1)] if axes_c is not None else list(range(len(pads) // 2))
        if len(pads) != 2 * len(axes):
            raise _Unsupported(node, f"pads {pads} do not match the axes")
        for i, a in enumerate(axes):
            full[a], full[a + 4] = pads[i], pads[i + len(axes)]
        if full[0] or full[1] or full[4] or full[5] or min(full) < 0:
            raise _Unsupported(node, f"pads {pads} (only non-negative padding of H and W)")
        self._emit(node, "Pad", [x], {"pads": [full[2], full[3], full[6], full[7]], "value": value})

    # ------------------------------------------------------------------ shapes
    def _view(self, node: OnnxNode, out_shape: tuple[int, ...]) -> None:
        """A reshape of a run-time tensor to ``out_shape`` (full shape, batch first)."""
        src = node.inputs[0]
        in_shape = self._runtime_shape(src)
        if len(out_shape) < 2 or out_shape[0] != in_shape[0] or int(np.prod(out_shape)) != int(np.prod(in_shape)):
            raise _Unsupported(node, f"reshapes {in_shape} to {out_shape}, changing the batch dimension")
        root = self.pending[src][0] if src in self.pending else src
        root_shape = self._runtime_shape(root)
        if tuple(in_shape) == tuple(out_shape):
            self._alias(node, src)
        elif len(root_shape) == 2 and tuple(out_shape[:2]) == tuple(root_shape) and all(d == 1 for d in out_shape[2:]):
            self.pending[node.outputs[0]] = (root, tuple(out_shape))
        elif len(out_shape) == 2:
            self._emit(node, "Flatten", [self._tensor(src)], {"axis": 1})
        else:
            self._emit(node, "Reshape", [self._tensor(src)], {"shape": list(out_shape[1:])})

    def _op_Flatten(self, node: OnnxNode) -> None:
        in_shape = self._runtime_shape(node.inputs[0])
        axis = int(node.attr("axis", 1)) % max(len(in_shape), 1)
        if axis != 1:
            raise _Unsupported(node, f"axis={node.attr('axis')} (only 1: keep the batch)")
        self._view(node, (in_shape[0], int(np.prod(in_shape[1:]))))

    def _op_Reshape(self, node: OnnxNode) -> None:
        target = self._c(node, 1, "the target shape")
        in_shape = self._runtime_shape(node.inputs[0])
        dims = [int(d) for d in target.reshape(-1)]  # type: ignore[union-attr]
        if not node.attr("allowzero", 0):
            dims = [in_shape[i] if d == 0 and i < len(in_shape) else d for i, d in enumerate(dims)]
        if dims.count(-1) == 1:
            known = int(np.prod([d for d in dims if d != -1]))
            total = int(np.prod(in_shape))
            if known <= 0 or total % known:
                raise _Unsupported(node, f"cannot reshape {in_shape} to {dims}")
            dims = [total // known if d == -1 else d for d in dims]
        self._view(node, tuple(dims))

    def _axes(self, node: OnnxNode) -> list[int] | None:
        axes = node.attr("axes")
        if axes is None and len(node.inputs) > 1:
            c = self._c(node, 1, "axes")
            axes = None if c is None else [int(a) for a in c.reshape(-1)]
        return None if axes is None else [int(a) for a in axes]

    def _op_Squeeze(self, node: OnnxNode) -> None:
        in_shape = self._runtime_shape(node.inputs[0])
        axes = self._axes(node)
        rank = len(in_shape)
        drop = {a % rank for a in axes} if axes is not None else {i for i, d in enumerate(in_shape) if d == 1}
        self._view(node, tuple(d for i, d in enumerate(in_shape) if i not in drop))

    def _op_Unsqueeze(self, node: OnnxNode) -> None:
        in_shape = list(self._runtime_shape(node.inputs[0]))
        axes = self._axes(node) or []
        rank = len(in_shape) + len(axes)
        for a in sorted(a % rank for a in axes):
            in_shape.insert(a, 1)
        self._view(node, tuple(in_shape))

    # ------------------------------------------------------------------ arithmetic
    def _binary(self, node: OnnxNode) -> None:
        kind = node.op
        a_name, b_name = node.inputs[:2]
        a_rt, b_rt = self._is_runtime(a_name), self._is_runtime(b_name)
        if kind == "Mul" and a_rt and b_rt:
            for view, other in ((b_name, a_name), (a_name, b_name)):
                if view in self.pending and self.tensor.get(self.pending[view][0]) in self.gate_tensors:
                    mask = self.tensor[self.pending[view][0]]
                    y = self._tensor(other)
                    if len(self.shape[y]) == 4 and self.shape[y][1] == self.shape[mask][1]:
                        self._emit(node, "ChannelMask", [y, mask])
                        return
        if a_rt and b_rt:
            x, y = self._tensor(a_name), self._tensor(b_name)
            if kind == "Div":
                raise _Unsupported(node, "division by a run-time tensor")
            out_shape = tuple(np.broadcast_shapes(self.shape[x], self.shape[y]))
            if kind == "Sub":
                y = self._add("Mul", [y], f"{node.outputs[0]}:neg", f"{sanitise_name(node.name)}:neg",
                              weights={"constant": np.array([-1.0], np.float32)})
            if self.shape[x] != out_shape and self.shape[y] == out_shape:
                x, y = y, x
            if self.shape[x] != out_shape:
                raise _Unsupported(node, f"broadcasts {self.shape[x]} and {self.shape[y]} to a larger shape")
            self._emit(node, "Add" if kind in ("Add", "Sub") else "Mul", [x, y])
            return
        tensor_first = a_rt
        t = self._tensor(a_name if a_rt else b_name)
        c = self.const[b_name if a_rt else a_name].astype(np.float32)
        out_shape = tuple(np.broadcast_shapes(self.shape[t], c.shape))
        if out_shape != self.shape[t]:
            raise _Unsupported(node, f"a constant of shape {c.shape} enlarges {self.shape[t]}")
        if c.ndim == len(out_shape):
            if c.shape[0] != 1:
                raise _Unsupported(node, f"a constant of shape {c.shape} with a batch dimension")
            c = c[0]
        c = c.reshape(1) if c.ndim == 0 else c
        if kind == "Div" and not tensor_first:
            raise _Unsupported(node, "a constant divided by a run-time tensor")
        if kind == "Sub" and not tensor_first:
            neg = self._add("Mul", [t], f"{node.outputs[0]}:neg", f"{sanitise_name(node.name)}:neg",
                            weights={"constant": np.array([-1.0], np.float32)})
            self._emit(node, "Add", [neg], weights={"constant": c})
            return
        op = "Mul" if kind in ("Mul", "Div") else "Add"
        if kind == "Sub":
            c = -c
        elif kind == "Div":
            with np.errstate(divide="ignore"):
                c = (1.0 / c).astype(np.float32)
            if not np.isfinite(c).all():
                raise _Unsupported(node, "division by zero")
        self._emit(node, op, [t], weights={"constant": c})

    _op_Add = _op_Mul = _op_Sub = _op_Div = _binary

    # ------------------------------------------------------------------ gates
    def _gate(self, m: GateMatch) -> None:
        if not self._is_runtime(m.input):
            self.problems.append(f"{m.op} (node {m.name!r}): its input is not computed from the model input")
            return
        x = self._tensor(m.input)
        if len(self.shape[x]) != 4:
            self.problems.append(f"{m.op} (node {m.name!r}): input of shape {self.shape[x]} (expected rank 4)")
            return
        out = self._add(m.op, [x], m.output, sanitise_name(m.name), m.attrs, m.weights)
        self.gate_tensors.add(out)

    def _explicit_gate(self, node: OnnxNode) -> None:
        """A custom-domain ``ai.parsicore`` node carrying the gate's parsicore attributes directly."""
        if node.op == "ChannelMask":
            y, mask = (self._tensor(t) for t in node.inputs[:2])
            self._emit(node, "ChannelMask", [y, mask])
            return
        x = self._x(node, (4,))
        if node.op == "LKAMGate":
            names = ("w1", "b1", "w2", "b2")
            keys = ("kernel_size", "activation", "pool", "threshold", "mode")
        elif node.op == "TopKGate":
            names = ("weight", "bias")
            keys = ("keep_ratio", "activation", "pool", "scaled")
        else:
            raise _Unsupported(node)
        weights = {n: self._c(node, i + 1, n) for i, n in enumerate(names)}
        attrs = {k: node.attrs[k] for k in keys if k in node.attrs}
        if "scaled" in attrs:
            attrs["scaled"] = bool(attrs["scaled"])
        if node.op == "LKAMGate" and "kernel_size" not in attrs and weights.get("w1") is not None:
            attrs["kernel_size"] = int(weights["w1"].shape[2])  # type: ignore[union-attr]
        self.gate_tensors.add(self._emit(node, node.op, [x], attrs, weights))

"""parsicore -> ONNX: ``export_onnx(model_file, path, opset=17)``, to run the same weights in ONNX Runtime.

onnx is imported inside the functions only (the optional extra ``onnx``). Every parsicore op maps to standard
ONNX ops; nothing in the file needs a custom domain, so any ONNX runtime can run it.

Gates are written *densely*, the only way a dense engine can run them, following the "ONNX gate convention"
of FORMAT.md so that ``parsicore convert`` brings the file back gated:

- ``LKAMGate``: ``Conv(w1, b1, pads k//2) [-> Relu -> Conv(w2, b2)] -> ReduceMean|ReduceMax(axes 2,3,
  keepdims 0) -> Sigmoid = s``; mask ``Cast<float>(Greater(s, threshold))`` (hard) or ``Mul(that, s)``
  (scaled).
- ``TopKGate``: ``ReduceMean|ReduceMax(X, axes 2,3, keepdims 0) -> Gemm(weight, bias, transB 1) [-> Relu]
  = g``; ``keep = ScatterElements(ConstantOfShape(Shape(g), 0), TopK(g, k).indices,
  ConstantOfShape(Shape(indices), 1), axis 1)``; mask ``keep`` or ``Mul(keep, g)`` (scaled).
- ``ChannelMask``: ``Mul(Y, Unsqueeze(mask, axes [2, 3]))`` (or ``Mul(Y, mask)`` for (N, K) tensors).

The threshold of LKAM gates and the keep ratio of top-k gates are constants of the file: pass ``threshold``
/ ``keep`` to bake a run-time override in (re-export for another value). ONNX ``TopK`` breaks ties by the
lower index, as the engine does.

Tensor names are parsicore's own (inputs, outputs and every intermediate), so a runtime can be asked for
the same intermediate tensors the engine computes; the gates' internal tensors are named ``<gate>/...``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parsicore.errors import ConversionError
from parsicore.format import ModelFile, read_model
from parsicore.gates import check_keep, check_threshold
from parsicore.graph import Graph, Node
from parsicore.ops.gates import kept_count

#: HardSwish (opset 14) is the newest op the mapping needs.
MIN_OPSET = 14


def export_onnx(model_file: ModelFile | str | os.PathLike[str], path: str | os.PathLike[str] | None = None,
                opset: int = 17, threshold: float | None = None, keep: float | None = None) -> Any:
    """Convert a parsicore model (a ModelFile or a path) to an ONNX ``ModelProto``; save it to ``path`` if given.

    threshold / keep: override every LKAM gate's threshold / every top-k gate's keep ratio (None: each gate's
    stored value), as ``model(x, threshold=..., keep=...)`` would. The batch dimension stays dynamic.
    Raises ConversionError (onnx missing, opset out of range), or the model's own ModelFormatError.
    """
    try:
        import onnx
    except ImportError as e:
        raise ConversionError("exporting to ONNX needs the onnx package (pip install 'parsicore[onnx]')") from e
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ConversionError(f"ONNX opset {opset} is not supported (choose {MIN_OPSET} to {newest})")
    source = model_file if isinstance(model_file, ModelFile) else read_model(model_file)
    graph = Graph.from_model_file(source)
    writer = _Writer(onnx, opset, check_threshold(threshold), check_keep(keep))
    for node in graph.nodes:
        writer.node(node)
    proto = writer.model(graph)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # a bug in the mapping, not in the user's model
        raise ConversionError(f"{graph.source}: the ONNX export does not validate: {e}") from e
    if path is not None:
        _save_atomic(onnx, proto, Path(path))
    return proto


def _save_atomic(onnx: Any, proto: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"{path}: cannot write the ONNX file: {e.strerror or e}") from e


class _Writer:
    """Accumulates ONNX nodes and initializers, one parsicore node at a time."""

    def __init__(self, onnx: Any, opset: int, threshold: float | None, keep: float | None) -> None:
        self.onnx = onnx
        self.helper = onnx.helper
        self.opset = opset
        self.threshold = threshold
        self.keep = keep
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()

    # ------------------------------------------------------------------ building blocks
    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer (float32 unless the array is int64); returns its (unique) name."""
        name = self._unique(name)
        arr = np.ascontiguousarray(value)
        if arr.dtype != np.int64:
            arr = arr.astype(np.float32)
        self.initializers.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def add(self, op: str, inputs: Sequence[str], outputs: Sequence[str] | str, name: str, **attrs: Any) -> str:
        outs = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(self.helper.make_node(op, list(inputs), outs, name=self._unique(name), **attrs))
        return outs[0]

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            i += 1
            name = f"{base}#{i}"
        self._names.add(name)
        return name

    def reduce(self, kind: str, x: str, out: str, name: str) -> str:
        """ReduceMean (avg) or ReduceMax (max) over H, W without keeping them: (N, C, H, W) -> (N, C)."""
        op = "ReduceMean" if kind == "avg" else "ReduceMax"
        # ReduceMean takes axes as an input from opset 18, ReduceMax too.
        if self.opset >= 18:
            axes = self.const(f"{name}/axes", np.array([2, 3], dtype=np.int64))
            return self.add(op, [x, axes], out, name, keepdims=0)
        return self.add(op, [x], out, name, axes=[2, 3], keepdims=0)

    # ------------------------------------------------------------------ nodes
    def node(self, node: Node) -> None:
        handler = getattr(self, f"_op_{node.type}", None)
        if handler is None:  # every op of the table has a mapping; a new op without one is a bug here
            raise ConversionError(f"node {node.name!r}: op {node.type} has no ONNX mapping")
        try:
            handler(node)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"node {node.name!r} ({node.type}): {e}") from e

    def _w(self, node: Node, key: str) -> str:
        return self.const(f"{node.name}/{key}", node.weights[key])

    def _op_Conv(self, node: Node) -> None:
        a = node.attrs
        inputs = [node.inputs[0], self._w(node, "weight")]
        if "bias" in node.weights:
            inputs.append(self._w(node, "bias"))
        w = node.weights["weight"]
        # parsicore's (top, left, bottom, right) is ONNX's (x1_begin, x2_begin, x1_end, x2_end).
        self.add("Conv", inputs, node.outputs[0], node.name, strides=list(a.stride), pads=list(a.pads),
                 dilations=list(a.dilation), group=a.groups, kernel_shape=list(w.shape[2:]))

    def _op_BatchNorm(self, node: Node) -> None:
        ins = [node.inputs[0]] + [self._w(node, k) for k in ("scale", "bias", "mean", "var")]
        self.add("BatchNormalization", ins, node.outputs[0], node.name, epsilon=node.attrs.epsilon)

    def _unary(self, node: Node, op: str, **attrs: Any) -> None:
        self.add(op, [node.inputs[0]], node.outputs[0], node.name, **attrs)

    def _op_Relu(self, node: Node) -> None:
        self._unary(node, "Relu")

    def _op_Sigmoid(self, node: Node) -> None:
        self._unary(node, "Sigmoid")

    def _op_Tanh(self, node: Node) -> None:
        self._unary(node, "Tanh")

    def _op_HardSwish(self, node: Node) -> None:
        self._unary(node, "HardSwish")

    def _op_LeakyRelu(self, node: Node) -> None:
        self._unary(node, "LeakyRelu", alpha=node.attrs.alpha)

    def _op_HardSigmoid(self, node: Node) -> None:
        self._unary(node, "HardSigmoid", alpha=node.attrs.alpha, beta=node.attrs.beta)

    def _op_Clip(self, node: Node) -> None:
        lo = self.const(f"{node.name}/lo", np.array(node.attrs.lo, dtype=np.float32))
        hi = self.const(f"{node.name}/hi", np.array(node.attrs.hi, dtype=np.float32))
        self.add("Clip", [node.inputs[0], lo, hi], node.outputs[0], node.name)

    def _op_Silu(self, node: Node) -> None:
        s = self.add("Sigmoid", [node.inputs[0]], f"{node.name}/sigmoid", f"{node.name}/Sigmoid")
        self.add("Mul", [node.inputs[0], s], node.outputs[0], node.name)

    def _pool(self, node: Node, op: str, **extra: Any) -> None:
        a = node.attrs
        self.add(op, [node.inputs[0]], node.outputs[0], node.name, kernel_shape=list(a.kernel),
                 strides=list(a.strides), pads=list(a.pads), ceil_mode=int(a.ceil_mode), **extra)

    def _op_MaxPool(self, node: Node) -> None:
        self._pool(node, "MaxPool")

    def _op_AveragePool(self, node: Node) -> None:
        self._pool(node, "AveragePool", count_include_pad=int(node.attrs.count_include_pad))

    def _op_GlobalAveragePool(self, node: Node) -> None:
        self._unary(node, "GlobalAveragePool")

    def _op_GlobalMaxPool(self, node: Node) -> None:
        self._unary(node, "GlobalMaxPool")

    def _op_Gemm(self, node: Node) -> None:
        ins = [node.inputs[0], self._w(node, "weight")]
        if "bias" in node.weights:
            ins.append(self._w(node, "bias"))
        self.add("Gemm", ins, node.outputs[0], node.name, transB=1)

    def _op_Flatten(self, node: Node) -> None:
        self._unary(node, "Flatten", axis=1)

    def _op_Reshape(self, node: Node) -> None:
        # 0 keeps the (dynamic) batch size; the target is the feature shape.
        shape = self.const(f"{node.name}/shape", np.array([0, *node.attrs.shape], dtype=np.int64))
        self.add("Reshape", [node.inputs[0], shape], node.outputs[0], node.name)

    def _op_Identity(self, node: Node) -> None:
        self._unary(node, "Identity")

    def _op_Dropout(self, node: Node) -> None:
        self._unary(node, "Identity")

    def _binary(self, node: Node, op: str) -> None:
        a = node.inputs[0]
        if len(node.inputs) == 1:
            b = self._w(node, "constant")  # right-aligned against the feature shape: numpy broadcasting agrees
        else:
            b = node.inputs[1]
            rank_a, rank_b = len(node.in_shapes[0]), len(node.in_shapes[1])
            if rank_b < rank_a:
                # parsicore pairs the batch dims and right-aligns the features: (N, *B) -> (N, 1, .., 1, *B).
                view = [0] + [1] * (rank_a - rank_b) + list(node.in_shapes[1])
                shape = self.const(f"{node.name}/broadcast_shape", np.array(view, dtype=np.int64))
                b = self.add("Reshape", [b, shape], f"{node.name}/broadcast", f"{node.name}/Reshape")
        self.add(op, [a, b], node.outputs[0], node.name)

    def _op_Add(self, node: Node) -> None:
        self._binary(node, "Add")

    def _op_Mul(self, node: Node) -> None:
        self._binary(node, "Mul")

    def _op_Concat(self, node: Node) -> None:
        self.add("Concat", list(node.inputs), node.outputs[0], node.name, axis=node.attrs.axis)

    def _op_Softmax(self, node: Node) -> None:
        self._unary(node, "Softmax", axis=node.attrs.axis)

    def _op_Pad(self, node: Node) -> None:
        top, left, bottom, right = node.attrs.pads
        pads = self.const(f"{node.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64))
        value = self.const(f"{node.name}/value", np.array(node.attrs.value, dtype=np.float32))
        self.add("Pad", [node.inputs[0], pads, value], node.outputs[0], node.name, mode="constant")

    # ------------------------------------------------------------------ gates
    def _op_LKAMGate(self, node: Node) -> None:
        a, name = node.attrs, node.name
        k = a.kernel_size
        h = self.add("Conv", [node.inputs[0], self._w(node, "w1"), self._w(node, "b1")], f"{name}/bank1",
                     f"{name}/bank1", kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1], dilations=[1, 1],
                     group=1)
        if "w2" in node.weights:
            if a.activation == "relu":
                h = self.add("Relu", [h], f"{name}/act", f"{name}/Relu")
            h = self.add("Conv", [h, self._w(node, "w2"), self._w(node, "b2")], f"{name}/bank2", f"{name}/bank2",
                         kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1], group=1)
        pooled = self.reduce(a.pool, h, f"{name}/pooled", f"{name}/pool")
        s = self.add("Sigmoid", [pooled], f"{name}/switches", f"{name}/Sigmoid")
        t = a.threshold if self.threshold is None else self.threshold
        thr = self.const(f"{name}/threshold", np.array(t, dtype=np.float32))
        on = self.add("Greater", [s, thr], f"{name}/on", f"{name}/Greater")
        if a.mode == "scaled":
            hard = self.add("Cast", [on], f"{name}/hard", f"{name}/Cast", to=self.onnx.TensorProto.FLOAT)
            self.add("Mul", [hard, s], node.outputs[0], f"{name}/Mul")
        else:
            self.add("Cast", [on], node.outputs[0], f"{name}/Cast", to=self.onnx.TensorProto.FLOAT)

    def _op_TopKGate(self, node: Node) -> None:
        a, name = node.attrs, node.name
        x = node.inputs[0]
        pooled = x if len(node.in_shapes[0]) == 1 else self.reduce(a.pool, x, f"{name}/pooled", f"{name}/pool")
        g = self.add("Gemm", [pooled, self._w(node, "weight"), self._w(node, "bias")], f"{name}/linear",
                     f"{name}/Gemm", transB=1)
        if a.activation == "relu":
            g = self.add("Relu", [g], f"{name}/saliency", f"{name}/Relu")
        total = node.weights["weight"].shape[0]
        ratio = a.keep_ratio if self.keep is None else self.keep
        kept = min(total, kept_count(ratio, total))
        k = self.const(f"{name}/k", np.array([kept], dtype=np.int64))
        indices = f"{name}/indices"
        self.add("TopK", [g, k], [f"{name}/values", indices], f"{name}/TopK", axis=1, largest=1, sorted=1)
        zero = self.helper.make_tensor("value", self.onnx.TensorProto.FLOAT, [1], [0.0])
        one = self.helper.make_tensor("value", self.onnx.TensorProto.FLOAT, [1], [1.0])
        g_shape = self.add("Shape", [g], f"{name}/saliency_shape", f"{name}/Shape")
        zeros = self.add("ConstantOfShape", [g_shape], f"{name}/zeros", f"{name}/zeros", value=zero)
        i_shape = self.add("Shape", [indices], f"{name}/indices_shape", f"{name}/Shape")
        ones = self.add("ConstantOfShape", [i_shape], f"{name}/ones", f"{name}/ones", value=one)
        if a.scaled:
            keep = self.add("ScatterElements", [zeros, indices, ones], f"{name}/keep", f"{name}/Scatter", axis=1)
            self.add("Mul", [keep, g], node.outputs[0], f"{name}/Mul")
        else:
            self.add("ScatterElements", [zeros, indices, ones], node.outputs[0], f"{name}/Scatter", axis=1)

    def _op_ChannelMask(self, node: Node) -> None:
        x, mask = node.inputs
        if len(node.in_shapes[0]) == 3:
            axes = self.const(f"{node.name}/axes", np.array([2, 3], dtype=np.int64))
            mask = self.add("Unsqueeze", [mask, axes], f"{node.name}/mask_view", f"{node.name}/Unsqueeze")
        self.add("Mul", [x, mask], node.outputs[0], node.name)

    # ------------------------------------------------------------------ the model
    def model(self, graph: Graph) -> Any:
        helper, tp = self.helper, self.onnx.TensorProto

        def value_info(name: str, feature_shape: Sequence[int]) -> Any:
            return helper.make_tensor_value_info(name, tp.FLOAT, ["N", *[int(d) for d in feature_shape]])

        inputs = [value_info(t, graph.shapes[t]) for t in graph.inputs]
        outputs = [value_info(t, graph.shapes[t]) for t in graph.outputs]
        meta = graph.model.metadata
        onnx_graph = helper.make_graph(self.nodes, _graph_name(meta.get("name")), inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        proto = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="parsicore.export.onnx_export")
        # The newest IR the opset allows would be refused by older runtimes; the oldest one that carries it is not.
        proto.ir_version = helper.find_min_ir_version_for(opsets)
        proto.doc_string = str(meta.get("description", ""))
        for key in ("name", "license", "producer", "weights_sha256"):
            if meta.get(key):
                entry = proto.metadata_props.add()
                entry.key, entry.value = f"parsicore.{key}", str(meta[key])
        return proto


def _graph_name(name: Any) -> str:
    return str(name) if name else "parsicore"


__all__ = ["MIN_OPSET", "export_onnx"]

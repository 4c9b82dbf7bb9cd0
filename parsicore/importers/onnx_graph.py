"""An ONNX graph flattened for conversion: local functions inlined, attributes decoded, constants folded.

:func:`flatten_graph` turns a ``ModelProto`` into a list of :class:`OnnxNode` (each keeps its NodeProto so
constant folding can run it through ``onnx.reference``), with model-local functions inlined: the nodes
of a function call carry the call's name in ``group`` and its op type in ``group_op``, which is how a
gate exported as an ONNX function keeps its boundary (see FORMAT.md, "ONNX gate convention").
:class:`GraphView` answers producer/consumer/constant questions for the gate matcher and the importer.

onnx is imported by the caller (the importer) and passed in; nothing here imports it at module level.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Largest constant folded at import time (elements); bigger ones are weights and come from initializers.
MAX_FOLDED_ELEMENTS = 1 << 24


@dataclass
class OnnxNode:
    """One node after inlining. attrs: decoded values (ints, floats, strings, lists, numpy tensors)."""

    index: int
    name: str
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    proto: Any = field(repr=False)
    group: str | None = None  # name of the gate-function call this node was inlined from
    group_op: str | None = None

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    @property
    def label(self) -> str:
        return f"{self.op} (node {self.name!r})"


def decode_attrs(onnx: Any, proto: Any) -> dict[str, Any]:
    """NodeProto attributes as Python values; strings decoded, tensors as numpy arrays."""
    out: dict[str, Any] = {}
    for a in proto.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", "replace") for v in value]
        out[a.name] = value
    return out


def _function_key(node: Any) -> tuple[str, str, str]:
    return (node.domain, node.op_type, getattr(node, "overload", ""))


def flatten_graph(onnx: Any, model: Any, is_gate_function: Any) -> list[OnnxNode]:
    """Main-graph nodes with model-local functions inlined (recursively), in a topological order.

    is_gate_function(domain, name) -> op type ("LKAMGate"/"TopKGate") or None: calls of those functions
    have their body nodes tagged with the call's name (``group``) and that op type (``group_op``).
    """
    functions = {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
    nodes: list[OnnxNode] = []
    counter = [0]

    def emit(proto: Any, group: str | None, group_op: str | None) -> None:
        key = _function_key(proto)
        if key in functions:
            call_name = proto.name or f"{proto.op_type}_{counter[0]}"
            gate_op = is_gate_function(proto.domain, proto.op_type)
            body = _inline_call(onnx, proto, functions[key], call_name)
            for inner in body:
                if gate_op and group is None:
                    emit(inner, call_name, gate_op)
                else:
                    emit(inner, group, group_op)
            return
        counter[0] += 1
        nodes.append(OnnxNode(len(nodes), proto.name or f"{proto.op_type}_{counter[0]}", proto.op_type,
                              proto.domain, list(proto.input), list(proto.output), decode_attrs(onnx, proto), proto,
                              group, group_op))

    for proto in model.graph.node:
        emit(proto, None, None)
    return nodes


def _inline_call(onnx: Any, call: Any, function: Any, call_name: str) -> list[Any]:
    """The function's body as NodeProtos renamed for this call (formal -> actual tensors, internals prefixed)."""
    rename: dict[str, str] = {}
    for formal, actual in zip(function.input, call.input):
        rename[formal] = actual
    for formal in list(function.input)[len(call.input):]:
        rename[formal] = ""
    for formal, actual in zip(function.output, call.output):
        rename[formal] = actual
    call_attrs = {a.name: a for a in call.attribute}
    defaults = {a.name: a for a in getattr(function, "attribute_proto", [])}
    body = []
    for i, inner in enumerate(function.node):
        new = onnx.NodeProto()
        new.CopyFrom(inner)
        new.name = f"{call_name}/{inner.name or inner.op_type + '_' + str(i)}"
        del new.input[:]
        del new.output[:]
        new.input.extend(rename.get(t, f"{call_name}/{t}") if t else "" for t in inner.input)
        new.output.extend(rename.get(t, f"{call_name}/{t}") if t else "" for t in inner.output)
        del new.attribute[:]
        for a in inner.attribute:
            if a.ref_attr_name:
                source = call_attrs.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
                if source is None:
                    continue
                resolved = onnx.AttributeProto()
                resolved.CopyFrom(source)
                resolved.name = a.name
                new.attribute.append(resolved)
            else:
                new.attribute.append(a)
        body.append(new)
    return body


class GraphView:
    """Producer/consumer maps and constant values over a flattened node list."""

    def __init__(self, nodes: list[OnnxNode], constants: dict[str, np.ndarray], graph_outputs: Iterable[str]) -> None:
        self.nodes = nodes
        self.constants = constants
        self.graph_outputs = set(graph_outputs)
        self.producer: dict[str, OnnxNode] = {}
        self.consumers: dict[str, list[OnnxNode]] = {}
        for n in nodes:
            for t in n.outputs:
                if t:
                    self.producer[t] = n
            for t in n.inputs:
                if t:
                    self.consumers.setdefault(t, []).append(n)

    def const(self, tensor: str) -> np.ndarray | None:
        return self.constants.get(tensor) if tensor else None

    def produced_by(self, tensor: str, *ops: str) -> OnnxNode | None:
        """The producer of ``tensor`` when its op type is one of ``ops``."""
        node = self.producer.get(tensor)
        return node if node is not None and node.op in ops else None

    def users(self, tensor: str) -> list[OnnxNode]:
        return self.consumers.get(tensor, [])

    def sole_user(self, tensor: str, *ops: str) -> OnnxNode | None:
        users = self.users(tensor)
        if len(users) == 1 and tensor not in self.graph_outputs and users[0].op in ops:
            return users[0]
        return None


def same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
              upper: bool) -> list[int]:
    """ONNX auto_pad SAME_UPPER/SAME_LOWER as explicit (top, left, bottom, right) pads."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return [begin[0], begin[1], end[0], end[1]]


def gemm_weight_bias(b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
                     trans_b: int) -> tuple[np.ndarray, np.ndarray | None]:
    """ONNX Gemm ``alpha * A @ op(B) + beta * C`` as parsicore's (weight (K, F), bias (K,)); ValueError if C
    is not per-output."""
    weight = (b if trans_b else b.T).astype(np.float64) * alpha
    k = weight.shape[0]
    bias = None
    if c is not None:
        flat = np.asarray(c, dtype=np.float64)
        if flat.size == 1:
            flat = np.full(k, flat.reshape(()))
        elif flat.ndim >= 1 and flat.shape[-1] == k and flat.size == k:
            flat = flat.reshape(k)
        else:
            raise ValueError(f"bias C of shape {c.shape} is not per output (K={k})")
        bias = (flat * beta).astype(np.float32)
    return weight.astype(np.float32), bias

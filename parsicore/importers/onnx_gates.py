"""Recognising parsicore's gates in an ONNX graph (the "ONNX gate convention" of FORMAT.md).

A gate's dense computation in standard ops is matched *semantically* from an anchor node:

- LKAMGate, anchored on ``Greater``::

      x -> Conv(bank1, k x k, stride 1, pads k//2) [-> Relu] [-> Conv(bank2, 1x1)]
        -> ReduceMean|ReduceMax(axes 2,3, keepdims 0) -> Sigmoid = s
      mask = Cast<float>(Greater(s, threshold))               (mode hard)
      mask = Mul(Cast<float>(Greater(s, threshold)), s)        (mode scaled)

- TopKGate, anchored on ``TopK``::

      x -> ReduceMean|ReduceMax(axes 2,3, keepdims 0) (or GlobalAveragePool|GlobalMaxPool -> Flatten)
        -> Gemm (or MatMul -> Add) [-> Relu] = g
      keep = ScatterElements(zeros, TopK(g, k, axis 1).indices, ones, axis 1)
      mask = keep (scaled false) | Mul(keep, g) (scaled true);   keep_ratio = k / K

These are what ``torch.onnx.export`` emits for :mod:`parsicore.export.torch_modules` (opset 11+), either
inline or inside a model-local ONNX function (``export_modules_as_functions``, opset 15+). Every
intermediate tensor of a match must be used only inside the match. When the nodes come from a gate
function, the match must also lie inside that function and claim its whole body; a gate function whose
body does not match is reported as a conversion problem instead of being silently run densely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parsicore.importers.onnx_graph import GraphView, OnnxNode, gemm_weight_bias

GATE_OPS = ("LKAMGate", "TopKGate")


@dataclass
class GateMatch:
    """A recognised gate: the parsicore op to emit and the ONNX nodes it replaces."""

    op: str
    input: str
    output: str
    attrs: dict[str, Any]
    weights: dict[str, np.ndarray]
    nodes: list[OnnxNode] = field(default_factory=list)

    @property
    def last(self) -> OnnxNode:
        return max(self.nodes, key=lambda n: n.index)

    @property
    def name(self) -> str:
        """A name for the gate node: the function call's name, or the ONNX scope its nodes share."""
        groups = {n.group for n in self.nodes}
        if len(groups) == 1 and None not in groups:
            return str(groups.pop())
        prefix = os.path.commonprefix([n.name for n in self.nodes])
        prefix = prefix[: prefix.rfind("/")] if "/" in prefix else ""
        return prefix.strip("/") or f"{self.op}_{self.last.index}"


def gate_function_op(domain: str, name: str) -> str | None:
    """The gate op a model-local function stands for: ``LKAMGate``/``TopKGate`` (torch adds ``.1``, ``.2``... to
    variants), in the domain ``ai.parsicore`` or a Python module path ending in ``torch_modules``."""
    if domain != "ai.parsicore" and not domain.endswith("torch_modules"):
        return None
    base = name.split(".")[0]
    return base if base in GATE_OPS else None


def _reduce_pool(view: GraphView, node: OnnxNode | None) -> str | None:
    """'avg'/'max' when ``node`` is a ReduceMean/ReduceMax over axes {2, 3} with keepdims 0."""
    if node is None or node.attr("keepdims", 1) != 0:
        return None
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1:
        c = view.const(node.inputs[1])
        axes = None if c is None else [int(a) for a in c.reshape(-1)]
    if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
        return None
    return "avg" if node.op == "ReduceMean" else "max"


def _only_used_by(view: GraphView, tensor: str, node: OnnxNode) -> bool:
    users = view.users(tensor)
    return tensor not in view.graph_outputs and len(users) == 1 and users[0] is node


def _conv_weights(view: GraphView, conv: OnnxNode) -> tuple[np.ndarray, np.ndarray] | None:
    if len(conv.inputs) < 3:
        return None
    w, b = view.const(conv.inputs[1]), view.const(conv.inputs[2])
    if w is None or b is None or w.ndim != 4:
        return None
    return w.astype(np.float32), b.astype(np.float32)


def _plain_conv(conv: OnnxNode, k: int) -> bool:
    """stride 1, dilation 1, one group, explicit pads k//2 on every side."""
    pad = k // 2
    return (list(conv.attr("strides", [1, 1])) == [1, 1] and list(conv.attr("dilations", [1, 1])) == [1, 1]
            and conv.attr("group", 1) == 1 and conv.attr("auto_pad", "NOTSET") in ("NOTSET", "")
            and list(conv.attr("pads", [0, 0, 0, 0])) == [pad] * 4)


def _same_group(nodes: list[OnnxNode]) -> bool:
    return len({n.group for n in nodes}) == 1


def _closed(view: GraphView, nodes: list[OnnxNode], output: str) -> bool:
    """Every tensor the nodes produce, except ``output``, is read only by these nodes."""
    inside = {id(n) for n in nodes}
    for n in nodes:
        for t in n.outputs:
            if not t or t == output:
                continue
            if t in view.graph_outputs or any(id(u) not in inside for u in view.users(t)):
                return False
    return True


def match_lkam(view: GraphView, greater: OnnxNode) -> GateMatch | None:
    """An LKAMGate anchored on a Greater node, or None."""
    if len(greater.inputs) != 2:
        return None
    s, t = greater.inputs
    threshold = view.const(t)
    sig = view.produced_by(s, "Sigmoid")
    if threshold is None or threshold.size != 1 or sig is None:
        return None
    red = view.produced_by(sig.inputs[0], "ReduceMean", "ReduceMax")
    pool = _reduce_pool(view, red)
    if pool is None:
        return None
    last = view.produced_by(red.inputs[0], "Conv")  # type: ignore[union-attr]
    if last is None:
        return None
    nodes = [greater, sig, red, last]
    first, activation = last, "relu"
    last_w = _conv_weights(view, last)
    if last_w is None:
        return None
    if last_w[0].shape[2:] == (1, 1) and _plain_conv(last, 1):
        before = last.inputs[0]
        relu = view.produced_by(before, "Relu")
        candidate = None
        if relu is not None and _only_used_by(view, before, last):
            candidate = view.produced_by(relu.inputs[0], "Conv")
            if candidate is not None and _only_used_by(view, relu.inputs[0], relu) and \
                    _same_group([greater, relu, candidate]):
                nodes += [relu, candidate]
                first = candidate
        if first is last:
            candidate = view.produced_by(before, "Conv")
            if candidate is not None and _only_used_by(view, before, last) and _same_group([greater, candidate]):
                nodes.append(candidate)
                first, activation = candidate, "none"
    first_w = _conv_weights(view, first)
    if first_w is None:
        return None
    w1, b1 = first_w
    k = w1.shape[2]
    if w1.shape[2] != w1.shape[3] or k % 2 == 0 or not _plain_conv(first, k):
        return None
    weights = {"w1": w1, "b1": b1}
    if first is not last:
        weights.update(w2=last_w[0], b2=last_w[1])
    cast = view.sole_user(greater.outputs[0], "Cast")
    if cast is None or cast.attr("to") != 1:  # TensorProto.FLOAT
        return None
    nodes.append(cast)
    mode, output = "hard", cast.outputs[0]
    mul = view.sole_user(cast.outputs[0], "Mul")
    if mul is not None and sorted(mul.inputs) == sorted([cast.outputs[0], s]):
        nodes.append(mul)
        mode, output = "scaled", mul.outputs[0]
    if not _same_group(nodes) or not _closed(view, nodes, output):
        return None
    thr = float(threshold.reshape(()))
    if not 0.0 <= thr <= 1.0:
        return None
    attrs = {"kernel_size": int(k), "activation": activation, "pool": pool, "threshold": thr, "mode": mode}
    return GateMatch("LKAMGate", first.inputs[0], output, attrs, weights, nodes)


def _is_filled(view: GraphView, tensor: str, value: float, claim: list[OnnxNode]) -> bool:
    """``tensor`` is a constant filled with ``value``, or ConstantOfShape/Expand building one (claimed)."""
    c = view.const(tensor)
    if c is not None:
        return c.size > 0 and bool(np.all(c == value))
    node = view.produced_by(tensor, "ConstantOfShape", "Expand")
    if node is None:
        return False
    if node.op == "ConstantOfShape":
        fill = node.attr("value")
        ok = (value == 0.0 and fill is None) or (fill is not None and bool(np.all(np.asarray(fill) == value)))
    else:
        src = view.const(node.inputs[0])
        ok = src is not None and src.size > 0 and bool(np.all(src == value))
    if not ok:
        return False
    claim.append(node)
    shape_src = view.produced_by(node.inputs[-1] if node.op == "Expand" else node.inputs[0], "Shape")
    if shape_src is not None:
        claim.append(shape_src)
    return True


def match_topk(view: GraphView, topk: OnnxNode) -> GateMatch | None:
    """A TopKGate anchored on a TopK node, or None."""
    if len(topk.inputs) < 2 or len(topk.outputs) != 2 or topk.attr("largest", 1) != 1:
        return None
    if topk.attr("axis", -1) not in (1, -1):
        return None
    a, k_name = topk.inputs[:2]
    k_arr = view.const(k_name)
    if k_arr is None or k_arr.size != 1:
        return None
    values, indices = topk.outputs
    if values and (view.users(values) or values in view.graph_outputs):
        return None
    scatters = [u for u in view.users(indices) if u.op in ("ScatterElements", "Scatter")]
    if len(scatters) != 1:
        return None
    scatter = scatters[0]
    if scatter.attr("axis", 0) not in (1, -1) or len(scatter.inputs) != 3 or scatter.inputs[1] != indices:
        return None
    nodes = [topk, scatter]
    if not _is_filled(view, scatter.inputs[0], 0.0, nodes) or not _is_filled(view, scatter.inputs[2], 1.0, nodes):
        return None
    scaled, output = False, scatter.outputs[0]
    mul = view.sole_user(scatter.outputs[0], "Mul")
    if mul is not None and sorted(mul.inputs) == sorted([scatter.outputs[0], a]):
        nodes.append(mul)
        scaled, output = True, mul.outputs[0]
    relu = view.produced_by(a, "Relu")
    activation, g = ("relu", relu.inputs[0]) if relu is not None else ("none", a)
    if relu is not None:
        nodes.append(relu)
    weight, bias, pooled = _linear(view, g, nodes)
    if weight is None or bias is None:
        return None
    red = view.produced_by(pooled, "ReduceMean", "ReduceMax")
    pool = _reduce_pool(view, red)
    if red is not None and pool is not None:
        nodes.append(red)
        x = red.inputs[0]
    else:
        flat = view.produced_by(pooled, "Flatten")
        gp = view.produced_by(flat.inputs[0], "GlobalAveragePool", "GlobalMaxPool") if flat is not None else None
        if flat is None or gp is None or flat.attr("axis", 1) != 1:
            return None
        nodes += [flat, gp]
        pool, x = ("avg" if gp.op == "GlobalAveragePool" else "max"), gp.inputs[0]
    k_total = weight.shape[0]
    kept = int(k_arr.reshape(()))
    if not 0 < kept <= k_total or not _same_group(nodes) or not _closed(view, nodes, output):
        return None
    attrs = {"keep_ratio": kept / k_total, "activation": activation, "pool": pool, "scaled": scaled}
    return GateMatch("TopKGate", x, output, attrs, {"weight": weight, "bias": bias}, nodes)


def _linear(view: GraphView, g: str, nodes: list[OnnxNode]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Weight (K, C), bias (K,) and input of the Gemm (or MatMul + Add) producing ``g``."""
    gemm = view.produced_by(g, "Gemm")
    if gemm is not None:
        b = view.const(gemm.inputs[1])
        c = view.const(gemm.inputs[2]) if len(gemm.inputs) > 2 else None
        if b is None or c is None or gemm.attr("transA", 0) != 0 or b.ndim != 2:
            return None, None, ""
        try:
            w, bias = gemm_weight_bias(b, c, float(gemm.attr("alpha", 1.0)), float(gemm.attr("beta", 1.0)),
                                       int(gemm.attr("transB", 0)))
        except ValueError:
            return None, None, ""
        nodes.append(gemm)
        return w, bias, gemm.inputs[0]
    add = view.produced_by(g, "Add")
    if add is None:
        return None, None, ""
    for mm_out, b_name in (add.inputs, add.inputs[::-1]):
        mm = view.produced_by(mm_out, "MatMul")
        b = view.const(b_name)
        w = view.const(mm.inputs[1]) if mm is not None else None
        if mm is not None and b is not None and w is not None and w.ndim == 2 and b.size == w.shape[1]:
            nodes += [add, mm]
            return w.T.astype(np.float32), b.reshape(-1).astype(np.float32), mm.inputs[0]
    return None, None, ""


def find_gates(view: GraphView) -> tuple[list[GateMatch], list[str]]:
    """Every gate in the graph, and problems (gate functions whose body is not a recognisable gate)."""
    matches: list[GateMatch] = []
    claimed: set[int] = set()
    for node in view.nodes:
        if node.op == "Greater":
            m = match_lkam(view, node)
        elif node.op == "TopK":
            m = match_topk(view, node)
        else:
            continue
        if m is None or any(n.index in claimed for n in m.nodes):
            continue
        expected_op = m.nodes[0].group_op
        if expected_op is not None and expected_op != m.op:
            continue
        matches.append(m)
        claimed |= {n.index for n in m.nodes}
    problems = []
    groups: dict[str, str] = {}
    for node in view.nodes:
        if node.group is not None and node.index not in claimed and node.op != "Constant":
            groups.setdefault(node.group, str(node.group_op))
    for call, op in groups.items():
        problems.append(f"{op} (node {call!r}): the gate function's body does not follow the ONNX gate convention")
    return matches, problems

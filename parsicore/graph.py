"""ModelFile -> Graph: op lookup, attribute parsing, topological order, shape inference, MACs.

Every failure is a typed error naming the model file and the node: UnsupportedOpError for unknown op
types, GraphError for everything else (bad attributes, missing/wrong weights, undefined tensors,
cycles, shapes that do not fit).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from parsicore.errors import GraphError, UnsupportedOpError
from parsicore.format import ModelFile, NodeSpec
from parsicore.ops import OPS, OpDef
from parsicore.ops.base import Shape, parse_attrs


@dataclass(frozen=True)
class Node:
    """A validated node: its definition, parsed attributes, weights, feature shapes and dense MACs per image."""

    name: str
    op: OpDef
    attrs: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: Mapping[str, np.ndarray]
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    macs: int

    @property
    def type(self) -> str:
        return self.op.type

    @property
    def params(self) -> int:
        return int(sum(w.size for w in self.weights.values()))


@dataclass(frozen=True)
class Graph:
    """Nodes in a topological order, tensor feature shapes, and the model's interface."""

    model: ModelFile
    nodes: tuple[Node, ...]
    shapes: Mapping[str, Shape]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def source(self) -> str:
        return self.model.source

    @property
    def total_macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def total_params(self) -> int:
        return sum(n.params for n in self.nodes)

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> nodes reading it."""
        out: dict[str, list[Node]] = {}
        for node in self.nodes:
            for t in node.inputs:
                out.setdefault(t, []).append(node)
        return out

    def producer(self) -> dict[str, Node]:
        """Tensor name -> the node writing it."""
        return {t: node for node in self.nodes for t in node.outputs}

    @classmethod
    def from_model_file(cls, model: ModelFile) -> Graph:
        src = model.source
        for spec in model.nodes:
            if spec.op not in OPS:
                unknown = sorted({f"{n.op} (node {n.name!r})" for n in model.nodes if n.op not in OPS})
                raise UnsupportedOpError(f"{src}: unsupported op type(s): {', '.join(unknown)}")
        order = _topological_order(model)
        shapes: dict[str, Shape] = {t.name: t.feature_shape for t in model.inputs}
        if len(shapes) != len(model.inputs):
            raise GraphError(f"{src}: two model inputs share a name")
        nodes = []
        for spec in order:
            nodes.append(_build_node(spec, model, shapes))
        for name in model.outputs:
            if name not in shapes:
                raise GraphError(f"{src}: model output {name!r} is not produced by any node")
        extra = sorted(set(model.weights) - {n.name for n in model.nodes})
        if extra:
            raise GraphError(f"{src}: weights stored for unknown node {extra[0]!r}")
        return cls(model, tuple(nodes), dict(shapes), tuple(t.name for t in model.inputs), tuple(model.outputs))


def _build_node(spec: NodeSpec, model: ModelFile, shapes: dict[str, Shape]) -> Node:
    src = model.source
    op = OPS[spec.op]
    where = f"{src}: node {spec.name!r} ({spec.op})"
    lo, hi = op.num_inputs
    if not lo <= len(spec.inputs) <= hi:
        expect = str(lo) if lo == hi else f"{lo} to {hi}"
        raise GraphError(f"{where}: takes {expect} input(s), got {len(spec.inputs)}")
    if len(spec.outputs) != op.num_outputs:
        raise GraphError(f"{where}: has {op.num_outputs} output(s), got {len(spec.outputs)}")
    try:
        attrs = parse_attrs(op.attrs, spec.attrs)
    except ValueError as e:
        raise GraphError(f"{where}: {e}") from e
    weights = model.weights.get(spec.name, {})
    missing = [w for w in op.weights if w not in weights]
    if missing:
        raise GraphError(f"{where}: missing weight(s) {', '.join(missing)}")
    unknown = sorted(set(weights) - set(op.weights) - set(op.optional_weights))
    if unknown:
        raise GraphError(f"{where}: unexpected weight(s) {', '.join(unknown)}")
    for key, arr in weights.items():
        if not np.all(np.isfinite(arr)):
            raise GraphError(f"{where}: weight {key!r} contains NaN or infinity")
    in_shapes = tuple(shapes[t] for t in spec.inputs)
    weight_shapes = {k: tuple(v.shape) for k, v in weights.items()}
    try:
        out_shapes = tuple(tuple(int(d) for d in s) for s in op.infer(attrs, in_shapes, weight_shapes))
        macs = int(op.macs(attrs, in_shapes, out_shapes, weight_shapes))
    except ValueError as e:
        raise GraphError(f"{where}: {e}") from e
    for t, s in zip(spec.outputs, out_shapes):
        if any(d < 1 for d in s):
            raise GraphError(f"{where}: output {t!r} would have shape {s}")
        shapes[t] = s
    return Node(spec.name, op, attrs, spec.inputs, spec.outputs, weights, in_shapes, out_shapes, macs)


def _topological_order(model: ModelFile) -> list[NodeSpec]:
    """Kahn's algorithm. Ties go to gates first (so a mask exists before the conv it gates), then file order."""
    src = model.source
    producer: dict[str, int] = {t.name: -1 for t in model.inputs}
    for i, n in enumerate(model.nodes):
        for t in n.outputs:
            if t in producer:
                raise GraphError(f"{src}: tensor {t!r} is produced twice (node {n.name!r})")
            producer[t] = i
    deps: list[set[int]] = []
    for n in model.nodes:
        d = set()
        for t in n.inputs:
            if t not in producer:
                raise GraphError(f"{src}: node {n.name!r} reads undefined tensor {t!r}")
            if producer[t] >= 0:
                d.add(producer[t])
        deps.append(d)
    users: list[list[int]] = [[] for _ in model.nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]

    def key(i: int) -> tuple[int, int]:
        return (0 if OPS[model.nodes[i].op].is_gate else 1, i)

    ready = [key(i) for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(model.nodes[i])
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, key(u))
    if len(order) != len(model.nodes):
        stuck = [model.nodes[i].name for i, r in enumerate(remaining) if r > 0]
        raise GraphError(f"{src}: the graph has a cycle through node(s) {', '.join(stuck[:5])}")
    return order

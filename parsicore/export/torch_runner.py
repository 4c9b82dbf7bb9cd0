"""Run a parsicore model's weights in PyTorch: ``TorchRunner(model_file)``, a benchmark peer and a cross-check.

torch is imported inside the functions only (the optional extra ``torch``). The runner is an ``nn.Module``
that walks the parsicore graph in its topological order and calls ``torch.nn.functional`` per node, as an
eager PyTorch model would: BatchNorm stays a separate ``F.batch_norm`` (PyTorch does not fold it in eager
mode), and gates are computed *densely* with the mask multiplied, the only way PyTorch can run them.

Gate semantics are parsicore's (FORMAT.md "Gates"): a channel is on when ``s > threshold`` (LKAM) or among
the ``ceil(keep_ratio * K)`` largest saliencies, ties going to the lower index (a stable sort, because
``torch.topk`` does not promise an order between equal values).

Example::

    runner = TorchRunner("model.h5", threads=2)
    logits = runner.run(x)["logits"]        # x: float32 numpy (N, C, H, W)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from parsicore.errors import ConversionError, InputError
from parsicore.format import ModelFile, read_model
from parsicore.gates import check_keep, check_threshold
from parsicore.graph import Graph, Node
from parsicore.ops.gates import kept_count


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ConversionError("running a model in PyTorch needs torch (pip install 'parsicore[torch]')") from e
    return torch


class TorchRunner:
    """A parsicore model as an eval-mode ``torch.nn.Module`` (``.module``) plus a numpy-in, numpy-out ``run``.

    model_file: a ModelFile or a path. threshold / keep: override every LKAM gate's threshold / every top-k
    gate's keep ratio (None: each gate's stored value). threads: ``torch.set_num_threads`` (process-wide in
    PyTorch) when given.
    """

    def __init__(self, model_file: ModelFile | str | os.PathLike[str], threshold: float | None = None,
                 keep: float | None = None, threads: int | None = None) -> None:
        torch = _torch()
        source = model_file if isinstance(model_file, ModelFile) else read_model(model_file)
        self.graph = Graph.from_model_file(source)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.module = _build_module(torch, self.graph, check_threshold(threshold), check_keep(keep)).eval()

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.graph.inputs

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """x: float32 (N, *feature shape) or a dict by input name -> outputs by name, float32 numpy arrays."""
        torch = _torch()
        feeds = self.to_tensors(x)
        with torch.inference_mode():
            outs = self.module(*feeds)
        return {name: t.numpy() for name, t in zip(self.graph.outputs, outs)}

    def to_tensors(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[Any]:
        """The module's positional inputs (torch tensors sharing memory with ``x``) in graph input order."""
        torch = _torch()
        if not isinstance(x, Mapping):
            if len(self.graph.inputs) != 1:
                raise InputError(f"this model has {len(self.graph.inputs)} inputs; pass a dict by name")
            x = {self.graph.inputs[0]: x}
        missing = [t for t in self.graph.inputs if t not in x]
        if missing:
            raise InputError(f"missing input(s) {missing}")
        return [torch.from_numpy(np.ascontiguousarray(x[t], dtype=np.float32)) for t in self.graph.inputs]


def _build_module(torch: Any, graph: Graph, threshold: float | None, keep: float | None) -> Any:
    """An nn.Module whose forward(*inputs) returns the outputs (tuple, graph order)."""
    from torch import nn
    from torch.nn import functional as F

    calls = []
    for node in graph.nodes:
        weights = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in node.weights.items()}
        try:
            calls.append((node, _node_fn(torch, F, node, weights, threshold, keep)))
        except ValueError as e:
            raise ConversionError(f"{graph.source}: node {node.name!r} ({node.type}): {e}") from e

    class ParsicoreGraph(nn.Module):
        """The weights live in the per-node closures (CPU float32 tensors sharing the model file's arrays)."""

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            env = dict(zip(graph.inputs, inputs))
            for node, fn in calls:
                outs = fn(*[env[t] for t in node.inputs])
                env[node.outputs[0]] = outs
            return tuple(env[t] for t in graph.outputs)

    return ParsicoreGraph()


def _pool_window(torch: Any, F: Any, node: Node, x: Any, kind: str) -> Any:
    """MaxPool/AveragePool with parsicore's (PyTorch's) rules, asymmetric pads done by explicit padding."""
    a = node.attrs
    top, left, bottom, right = a.pads
    kh, kw = a.kernel
    symmetric = top == bottom and left == right and top <= kh // 2 and left <= kw // 2
    if kind == "max":
        if symmetric:
            return F.max_pool2d(x, a.kernel, a.strides, (top, left), ceil_mode=a.ceil_mode)
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), a.kernel, a.strides,
                            ceil_mode=a.ceil_mode)
    if symmetric:
        return F.avg_pool2d(x, a.kernel, a.strides, (top, left), ceil_mode=a.ceil_mode,
                            count_include_pad=a.count_include_pad)
    raise ValueError(f"AveragePool pads {a.pads} (asymmetric or wider than half the kernel) are not supported")


def _node_fn(torch: Any, F: Any, node: Node, w: dict[str, Any], threshold: float | None,
             keep: float | None) -> Any:
    """The forward function of one node: tensors in, one tensor out."""
    t, a = node.type, node.attrs
    if t == "Conv":
        top, left, bottom, right = a.pads
        if top == bottom and left == right:
            return lambda x: F.conv2d(x, w["weight"], w.get("bias"), a.stride, (top, left), a.dilation, a.groups)
        return lambda x: F.conv2d(F.pad(x, (left, right, top, bottom)), w["weight"], w.get("bias"), a.stride, 0,
                                  a.dilation, a.groups)
    if t == "BatchNorm":
        return lambda x: F.batch_norm(x, w["mean"], w["var"], w["scale"], w["bias"], False, 0.0, a.epsilon)
    simple = {
        "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "HardSwish": F.hardswish, "Silu": F.silu,
        "Identity": lambda x: x, "Dropout": lambda x: x, "GlobalAveragePool": lambda x: x.mean((2, 3), keepdim=True),
        "GlobalMaxPool": lambda x: x.amax((2, 3), keepdim=True), "Flatten": lambda x: x.flatten(1),
    }
    if t in simple:
        return simple[t]
    if t == "Clip":
        return lambda x: torch.clamp(x, a.lo, a.hi)
    if t == "LeakyRelu":
        return lambda x: F.leaky_relu(x, a.alpha)
    if t == "HardSigmoid":
        return lambda x: torch.clamp(x * a.alpha + a.beta, 0.0, 1.0)
    if t in ("MaxPool", "AveragePool"):
        kind = "max" if t == "MaxPool" else "avg"
        if kind == "avg":
            _pool_window(torch, F, node, torch.zeros(1, *node.in_shapes[0]), kind)  # refuse unsupported pads now
        return lambda x: _pool_window(torch, F, node, x, kind)
    if t == "Gemm":
        return lambda x: F.linear(x, w["weight"], w.get("bias"))
    if t == "Reshape":
        return lambda x: x.reshape(x.shape[0], *a.shape)
    if t in ("Add", "Mul"):
        op = torch.add if t == "Add" else torch.mul
        if "constant" in w:
            return lambda x: op(x, w["constant"])
        rank_a, rank_b = len(node.in_shapes[0]), len(node.in_shapes[1])
        view = (1,) * (rank_a - rank_b) + tuple(node.in_shapes[1])
        # parsicore pairs the batch dims and right-aligns the features: (N, *B) -> (N, 1, .., 1, *B).
        return lambda x, y: op(x, y.reshape(y.shape[0], *view))
    if t == "Concat":
        return lambda *xs: torch.cat(xs, dim=a.axis)
    if t == "Softmax":
        return lambda x: torch.softmax(x, dim=a.axis)
    if t == "Pad":
        top, left, bottom, right = a.pads
        return lambda x: F.pad(x, (left, right, top, bottom), value=a.value)
    if t == "ChannelMask":
        return lambda x, m: x * m[:, :, None, None] if x.ndim == 4 else x * m
    if t == "LKAMGate":
        return _lkam_fn(torch, F, a, w, a.threshold if threshold is None else threshold)
    if t == "TopKGate":
        return _topk_fn(torch, F, node, a, w, a.keep_ratio if keep is None else keep)
    raise ValueError(f"op {t} has no PyTorch mapping")


def _pool_hw(x: Any, pool: str) -> Any:
    return x.mean((2, 3)) if pool == "avg" else x.amax((2, 3))


def _lkam_fn(torch: Any, F: Any, a: Any, w: dict[str, Any], threshold: float) -> Any:
    def gate(x: Any) -> Any:
        h = F.conv2d(x, w["w1"], w["b1"], 1, a.kernel_size // 2)
        if "w2" in w:
            if a.activation == "relu":
                h = F.relu(h)
            h = F.conv2d(h, w["w2"], w["b2"])
        s = torch.sigmoid(_pool_hw(h, a.pool))
        on = (s > threshold).to(s.dtype)
        return on * s if a.mode == "scaled" else on

    return gate


def _topk_fn(torch: Any, F: Any, node: Node, a: Any, w: dict[str, Any], keep_ratio: float) -> Any:
    total = int(w["weight"].shape[0])
    kept = min(total, kept_count(keep_ratio, total))

    def gate(x: Any) -> Any:
        pooled = _pool_hw(x, a.pool) if x.ndim == 4 else x
        g = F.linear(pooled, w["weight"], w["bias"])
        if a.activation == "relu":
            g = F.relu(g)
        order = torch.sort(-g, dim=1, stable=True).indices[:, :kept]
        mask = torch.zeros_like(g).scatter_(1, order, 1.0)
        return mask * g if a.scaled else mask

    return gate


__all__ = ["TorchRunner"]

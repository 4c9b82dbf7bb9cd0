"""A naive interpreter: runs a ModelFile node by node through the ops' references, densely.

No plan, no folding, no fusion, no skipping: every conv computes every channel, and a gate's mask is
multiplied in by ChannelMask. This is what every backend's gated, skipping, fused run must equal.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parsicore.format import ModelFile
from parsicore.graph import Graph


def naive_run(model: ModelFile, x: np.ndarray, threshold: float | None = None, keep: float | None = None,
              capture: bool = False) -> dict[str, np.ndarray]:
    """Outputs by name (all tensors when capture) for the single-input model ``model``."""
    graph = Graph.from_model_file(model)
    tensors: dict[str, np.ndarray] = {graph.inputs[0]: x.astype(np.float32)}
    for node in graph.nodes:
        attrs = node.attrs
        if node.type == "LKAMGate" and threshold is not None:
            attrs = dataclasses.replace(attrs, threshold=threshold)
        if node.type == "TopKGate" and keep is not None:
            attrs = dataclasses.replace(attrs, keep_ratio=keep)
        results = node.op.reference(attrs, [tensors[t] for t in node.inputs], node.weights)
        for t, r in zip(node.outputs, results):
            tensors[t] = np.asarray(r, dtype=np.float32)
    return tensors if capture else {t: tensors[t] for t in graph.outputs}

"""The ``reference`` backend: every op through its naive reference. Slow; for tests and debugging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parsicore.kernels.base import KernelSpec, apply_activation
from parsicore.ops import OPS


def _make(spec: KernelSpec) -> Any:
    op = OPS[spec.op]
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in spec.weights.items()}

    def run(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], **gating: Any) -> None:
        # Gate kernels output raw switches (the runtime applies thresholds), so gates use switches().
        compute = op.switches if op.is_gate else op.reference  # type: ignore[attr-defined]
        results = compute(spec.attrs, inputs, weights)
        for out, res in zip(outputs, results):
            out[...] = res
            apply_activation(out, spec.activation)
        # Gating only says which output channels are needed: zero the others, as the contract asks.
        active_out = gating.get("active_out")
        if active_out is not None:
            for n, channels in enumerate(active_out):
                keep = np.zeros(outputs[0].shape[1], dtype=bool)
                keep[channels] = True
                outputs[0][n, ~keep] = 0.0

    return run


FACTORIES = {name: _make for name in OPS}

"""Model: checks inputs, runs a Plan with a per-thread workspace, returns outputs and RunStats.

One Model may be called from many threads at once: the plan is frozen, and the buffers a run writes
into belong to the calling thread (allocated on its first call for a batch size, reused afterwards).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parsicore import gates
from parsicore.errors import InputError
from parsicore.format import ModelFile
from parsicore.graph import Graph
from parsicore.plan import Plan, Step


@dataclass(frozen=True)
class LayerStats:
    """One step of a run: kernels (output channels) on, MACs executed and dense, summed over the batch."""

    name: str
    op: str
    kernels_on: float  # mean over the batch
    kernels_total: int
    macs_executed: int
    macs_dense: int
    gated: bool


@dataclass(frozen=True)
class RunStats:
    """Compute accounting of one call. MACs are summed over the batch; fractions are executed/dense."""

    batch: int
    latency_ms: float
    layers: tuple[LayerStats, ...]

    @property
    def macs_executed(self) -> int:
        return sum(layer.macs_executed for layer in self.layers)

    @property
    def macs_dense(self) -> int:
        return sum(layer.macs_dense for layer in self.layers)

    @property
    def macs_fraction(self) -> float:
        dense = self.macs_dense
        return self.macs_executed / dense if dense else 1.0

    def fraction_of(self, ops: frozenset[str] | set[str] | tuple[str, ...]) -> float:
        """Executed/dense MACs over the layers whose op is in ``ops`` (e.g. ``{"Conv"}``: conv layers only)."""
        dense = sum(layer.macs_dense for layer in self.layers if layer.op in ops)
        executed = sum(layer.macs_executed for layer in self.layers if layer.op in ops)
        return executed / dense if dense else 1.0

    @property
    def kernels_on(self) -> float:
        return sum(layer.kernels_on for layer in self.layers if layer.gated)

    @property
    def kernels_total(self) -> int:
        return sum(layer.kernels_total for layer in self.layers if layer.gated)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch, "latency_ms": self.latency_ms,
            "macs_executed": self.macs_executed, "macs_dense": self.macs_dense,
            "macs_fraction": self.macs_fraction,
            "layers": [layer.__dict__ for layer in self.layers],
        }


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: name and shape (batch first, None = dynamic)."""

    name: str
    shape: tuple[int | None, ...]


def _conv_macs(step: Step, active_out: np.ndarray | None, active_in: np.ndarray | None) -> int:
    k = step.out_shapes[0][0]
    c = step.conv_in_channels
    g = step.conv_groups
    if active_out is None and active_in is None:
        return step.macs
    out_on = np.ones(k, dtype=bool) if active_out is None else np.isin(np.arange(k), active_out)
    in_on = np.ones(c, dtype=bool) if active_in is None else np.isin(np.arange(c), active_in)
    if g == 1:
        return int(out_on.sum()) * int(in_on.sum()) * step.conv_unit
    if g == c == k:
        return int((out_on & in_on).sum()) * step.conv_unit
    return int(out_on.sum()) * (c // g) * step.conv_unit  # other grouped convs ignore active_in


class Model:
    """A loaded model. Call it: ``model(x)`` / ``model.run(x, threshold=..., keep=...)``."""

    def __init__(self, model_file: ModelFile, graph: Graph, plan: Plan, threads: int | None = None) -> None:
        self._file = model_file
        self._graph = graph
        self._plan = plan
        self._threads = threads
        self._local = threading.local()

    # ------------------------------------------------------------------ description
    @property
    def backend(self) -> str:
        return self._plan.backend

    @property
    def threads(self) -> int | None:
        return self._threads

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, t.shape) for t in self._file.inputs]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(t, (None, *self._graph.shapes[t])) for t in self._graph.outputs]

    @property
    def labels(self) -> list[str]:
        return list(self._file.metadata.get("labels") or [])

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._file.metadata)

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def model_file(self) -> ModelFile:
        return self._file

    @property
    def last_stats(self) -> RunStats | None:
        """Stats of this thread's last call (None before the first)."""
        return getattr(self._local, "stats", None)

    # ------------------------------------------------------------------ running
    def __call__(self, x: np.ndarray | Mapping[str, np.ndarray], threshold: float | None = None,
                 keep: float | None = None) -> np.ndarray | dict[str, np.ndarray]:
        return self.run(x, threshold=threshold, keep=keep)

    def run(self, x: np.ndarray | Mapping[str, np.ndarray], threshold: float | None = None,
            keep: float | None = None) -> np.ndarray | dict[str, np.ndarray]:
        """Run on float32 NCHW input(s). One output: the array; several: a dict by output name."""
        outputs, stats = self.run_with_stats(x, threshold=threshold, keep=keep)
        self._local.stats = stats
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    def run_with_stats(self, x: np.ndarray | Mapping[str, np.ndarray], threshold: float | None = None,
                       keep: float | None = None, capture: bool = False) -> tuple[dict[str, np.ndarray], RunStats]:
        """Run and return (outputs by name, RunStats). capture=True also returns every intermediate tensor."""
        feeds = self._check_inputs(x)
        threshold = gates.check_threshold(threshold)
        keep = gates.check_keep(keep)
        n = next(iter(feeds.values())).shape[0]
        start = time.perf_counter()
        tensors, layers = self._execute(feeds, n, threshold, keep, capture)
        # Copies: the workspace is reused by this thread's next call.
        outputs = {t: np.array(tensors[t], copy=True) for t in self._graph.outputs}
        if capture:
            outputs = {**tensors, **outputs}
        latency = (time.perf_counter() - start) * 1000.0
        return outputs, RunStats(n, latency, tuple(layers))

    def _check_inputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        specs = self._file.inputs
        if isinstance(x, Mapping):
            missing = [s.name for s in specs if s.name not in x]
            extra = sorted(set(x) - {s.name for s in specs})
            if missing or extra:
                raise InputError(f"inputs must be exactly {[s.name for s in specs]}; missing {missing}, unknown {extra}")
            feeds = dict(x)
        else:
            if len(specs) != 1:
                raise InputError(f"this model has {len(specs)} inputs; pass a dict by name {[s.name for s in specs]}")
            feeds = {specs[0].name: x}
        batch = None
        for spec in specs:
            arr = feeds[spec.name]
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {spec.name!r} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.float32:
                raise InputError(f"input {spec.name!r} must be float32, got {arr.dtype} (use x.astype(np.float32))")
            expected = spec.feature_shape
            if arr.ndim != len(spec.shape) or tuple(arr.shape[1:]) != expected:
                want = "(N, " + ", ".join(str(d) for d in expected) + ")"
                raise InputError(f"input {spec.name!r} must have shape {want}, got {tuple(arr.shape)}")
            if arr.shape[0] < 1:
                raise InputError(f"input {spec.name!r} has batch size 0")
            if batch is not None and arr.shape[0] != batch:
                raise InputError("all inputs must have the same batch size")
            batch = arr.shape[0]
            if not np.isfinite(arr).all():
                raise InputError(f"input {spec.name!r} contains NaN or infinity")
        return feeds

    def _workspace(self, n: int) -> list[np.ndarray]:
        cache = getattr(self._local, "workspace", None)
        if cache is None or cache[0] != n:
            # One flat float32 buffer per slot, sized for this batch; kept for this thread's next calls.
            cache = (n, [np.empty(n * e, dtype=np.float32) for e in self._plan.slot_elements], {})
            self._local.workspace = cache
        return cache

    def _execute(self, feeds: dict[str, np.ndarray], n: int, threshold: float | None, keep: float | None,
                 capture: bool = False) -> tuple[dict[str, np.ndarray], list[LayerStats]]:
        """Run every step; returns the live tensors (copies of all of them when capture) and layer stats."""
        plan = self._plan
        _, slots, scratch = self._workspace(n)
        if self._threads:
            _set_threads(self._threads, plan.backend)
        tensors: dict[str, np.ndarray] = dict(feeds)
        captured: dict[str, np.ndarray] = dict(feeds)
        # Per tensor: None (any channel may be non-zero) or per image the channels that may be non-zero.
        nonzero: dict[str, list[np.ndarray] | None] = {}
        layers: list[LayerStats] = []
        for i, step in enumerate(plan.steps):
            ins = [tensors[t] for t in step.inputs]
            outs = []
            for t in step.outputs:
                size = int(np.prod(plan.shapes[t], dtype=np.int64))
                outs.append(slots[plan.slot_of[t]][: n * size].reshape((n, *plan.shapes[t])))
            if step.is_gate:
                switches = scratch.get(i)
                if switches is None or switches.shape != outs[0].shape:
                    switches = scratch[i] = np.empty_like(outs[0])
                step.kernel(ins, [switches])
                outs[0][...] = gates.mask_from_switches(step.op_type, step.attrs, switches, threshold, keep)
                layers.append(LayerStats(step.name, step.op_type, 0.0, 0, step.macs * n, step.macs * n, False))
            elif step.is_conv:
                active_out = gates.active_channels(tensors[step.gate_mask]) if step.gate_mask else None
                active_in = nonzero.get(step.inputs[0])
                if active_out is None and active_in is None:
                    step.kernel(ins, outs)
                else:
                    step.kernel(ins, outs, active_out=active_out, active_in=active_in)
                k = step.out_shapes[0][0]
                executed = sum(
                    _conv_macs(step, None if active_out is None else active_out[b],
                               None if active_in is None else active_in[b])
                    for b in range(n)
                )
                on = k if active_out is None else float(np.mean([len(a) for a in active_out]))
                layers.append(LayerStats(step.name, step.op_type, on, k, executed, step.macs * n,
                                         step.gate_mask is not None))
                if step.epilogue_macs:
                    # The fused epilogue (folded BN, activation) runs on the computed channels only.
                    layers.append(LayerStats(f"{step.name}:epilogue", "Epilogue", 0.0, 0,
                                             round(step.epilogue_macs * n * on / k), step.epilogue_macs * n, False))
                nonzero[step.outputs[0]] = active_out
            else:
                step.kernel(ins, outs)
                macs = (step.macs + step.epilogue_macs) * n
                if macs:
                    layers.append(LayerStats(step.name, step.op_type, 0.0, 0, macs, macs, False))
                nonzero[step.outputs[0]] = _propagate_zero(step, ins, nonzero, tensors)
            for t, arr in zip(step.outputs, outs):
                tensors[t] = arr
                if capture:
                    captured[t] = arr.copy()
        return (captured if capture else tensors), layers


def _propagate_zero(step: Step, ins: Sequence[np.ndarray], nonzero: Mapping[str, list[np.ndarray] | None],
                    tensors: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
    if step.op_type == "ChannelMask":
        on = gates.active_channels(tensors[step.inputs[1]])
        before = nonzero.get(step.inputs[0])
        if before is None:
            return on
        return [np.intersect1d(a, b) for a, b in zip(on, before)]
    if step.passes_zero:
        return nonzero.get(step.inputs[0])
    if step.op_type == "Concat" and all(nonzero.get(t) is not None for t in step.inputs):
        parts, offset = None, 0
        for t, shape in zip(step.inputs, step.in_shapes):
            sets = nonzero[t]
            shifted = [s + offset for s in sets]  # type: ignore[union-attr]
            parts = shifted if parts is None else [np.concatenate([a, b]) for a, b in zip(parts, shifted)]
            offset += shape[0]
        return parts
    return None


def _set_threads(threads: int, backend: str) -> None:
    if backend == "numba":
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

"""Model: checks inputs, runs a Plan with a per-thread workspace, returns outputs and RunStats.

One Model may be called from many threads at once: the plan is frozen, and the buffers a run writes
into belong to the calling thread (allocated on its first call for a batch size, reused afterwards).
"""

from __future__ import annotations

import threading
import time
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from parsicore import gates
from parsicore import threads as thread_control
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
    """Dense MACs of one image of a conv with these active output/input channels (sorted, unique)."""
    if active_out is None and active_in is None:
        return step.macs
    k = step.out_shapes[0][0]
    c = step.conv_in_channels
    g = step.conv_groups
    n_out = k if active_out is None else len(active_out)
    if g == 1:
        return n_out * (c if active_in is None else len(active_in)) * step.conv_unit
    if g == c == k:
        if active_out is None or active_in is None:
            both = len(active_in if active_out is None else active_out)
        else:
            on = np.zeros(k, dtype=bool)
            on[active_out] = True
            both = int(np.count_nonzero(on[active_in]))
        return both * step.conv_unit
    return n_out * (c // g) * step.conv_unit  # other grouped convs ignore active_in


#: How a step's set of possibly non-zero channels follows from its inputs (see _propagate_zero).
ZERO_NONE, ZERO_PASS, ZERO_MASK, ZERO_CONCAT = 0, 1, 2, 3
#: How _execute runs a step: its kernel alone (a conv no gate reaches, any other step with no gating
#: bookkeeping), a gate (switches, then the mask), a conv gating may reach (active channel lists, stats), or a
#: step that may be skipped or passes known-zero channels on (ChannelMask, channel-wise ops, Concat).
KIND_DENSE, KIND_GATE, KIND_GATED_CONV, KIND_OTHER = 0, 1, 2, 3


class _StepInfo(NamedTuple):
    """Facts about one step fixed by the plan: gating can reach it or not, and how zeros propagate."""

    index: int
    kind: int
    #: A conv whose output channels and input channels are always all active (no gate reaches it).
    static_dense: bool
    zero_rule: int
    #: A ChannelMask writing over its input (plan._masks_in_place) with a hard mask (values 0 or 1): when its
    #: input's possibly non-zero channels are the mask's own active channels (the conv before it was gated by
    #: this mask), multiplying changes nothing and the step is skipped.
    mask_is_identity_when_linked: bool = False
    #: A gated conv writing its output channel-compact: per image its R active channels in order in the first
    #: R planes (the rest of the buffer unused), not a full tensor with zero planes (see _compact_layouts).
    compact_out: bool = False
    #: A conv reading a channel-compact input (its active_in lists name the channels of those planes).
    compact_in: bool = False


def _step_infos(plan: Plan) -> tuple[_StepInfo, ...]:
    """Which steps may see gating: a tensor may have known-zero channels when a ChannelMask or a gated conv
    produced it, or a channel-wise step or concat passed such channels on."""
    maybe_zero: dict[str, bool] = {}
    hard_masks = {step.outputs[0] for step in plan.steps if step.is_gate and _gives_hard_mask(step)}
    infos = []
    for index, step in enumerate(plan.steps):
        if step.is_gate:
            rule, zero = ZERO_NONE, False
        elif step.is_conv:
            rule, zero = ZERO_NONE, step.gate_mask is not None
        elif step.op_type == "ChannelMask":
            rule, zero = ZERO_MASK, True
        elif step.passes_zero:
            rule, zero = ZERO_PASS, maybe_zero.get(step.inputs[0], False)
        elif step.op_type == "Concat":
            rule, zero = ZERO_CONCAT, all(maybe_zero.get(t, False) for t in step.inputs)
        else:
            rule, zero = ZERO_NONE, False
        for t in step.outputs:
            maybe_zero[t] = zero
        static_dense = step.is_conv and step.gate_mask is None and not maybe_zero.get(step.inputs[0], False)
        identity = (step.op_type == "ChannelMask" and step.inputs[1] in hard_masks
                    and plan.slot_of.get(step.inputs[0]) == plan.slot_of[step.outputs[0]])
        rule = rule if zero else ZERO_NONE
        if step.is_gate:
            kind = KIND_GATE
        elif step.is_conv:
            kind = KIND_DENSE if static_dense else KIND_GATED_CONV
        else:
            kind = KIND_OTHER if identity or rule != ZERO_NONE else KIND_DENSE
        infos.append(_StepInfo(index, kind, static_dense, rule, identity))
    return _compact_layouts(plan, infos)


def _compact_layouts(plan: Plan, infos: list[_StepInfo]) -> tuple[_StepInfo, ...]:
    """Mark the gated convs that write channel-compact outputs, and the convs that read them.

    A gated conv's output with most kernels off is mostly zero planes; written compact (its active channels
    packed in order at the start of each image), the conv writes, and its readers read, only the active
    planes. That is safe only when every reader knows the layout, so a gated conv (groups 1 or depthwise,
    kernel supporting it) goes compact only when each reader of its output is
      - a ChannelMask by the conv's own gate mask over it in place (skipped: the mask is an identity there),
        whose own readers qualify in turn, or
      - a conv (groups 1, or depthwise gated by the same mask and itself compact) reading it as its input.
    Graph outputs never are compact. Decided from the last step backwards (readers come after writers)."""
    steps = plan.steps
    readers: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for t in step.inputs:
            readers.setdefault(t, []).append(i)
    outputs = set(plan.outputs)
    compact_out = [False] * len(steps)

    def readers_ok(t: str, mask: str) -> bool:
        if t in outputs:
            return False
        for r in readers.get(t, []):
            reader, info = steps[r], infos[r]
            if reader.op_type == "ChannelMask":
                if not (reader.inputs == (t, mask) and info.mask_is_identity_when_linked
                        and readers_ok(reader.outputs[0], mask)):
                    return False
            elif not (reader.is_conv and reader.inputs[0] == t and _supports_compact(reader)
                      and (reader.conv_groups == 1
                           or (_is_depthwise(reader) and reader.gate_mask == mask and compact_out[r]))):
                return False
        return True

    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if (step.is_conv and step.gate_mask is not None and _supports_compact(step)
                and (step.conv_groups == 1 or _is_depthwise(step))):
            compact_out[i] = readers_ok(step.outputs[0], step.gate_mask)
    compact_tensors = set()
    for i, step in enumerate(steps):
        if compact_out[i]:
            compact_tensors.add(step.outputs[0])
        elif step.op_type == "ChannelMask" and step.inputs[0] in compact_tensors:
            compact_tensors.add(step.outputs[0])  # the skipped in-place mask: the same planes
    return tuple(info._replace(compact_out=compact_out[i],
                               compact_in=steps[i].is_conv and steps[i].inputs[0] in compact_tensors)
                 for i, info in enumerate(infos))


def _supports_compact(step: Step) -> bool:
    return bool(getattr(step.kernel, "supports_compact", False))


def _is_depthwise(step: Step) -> bool:
    return step.conv_groups == step.conv_in_channels == step.out_shapes[0][0]


def _gives_hard_mask(gate: Step) -> bool:
    """A gate step whose mask values are only 0.0 and 1.0 (gates.mask_from_switches)."""
    if gate.op_type == "LKAMGate":
        return gate.attrs.mode == "hard"
    return gate.op_type == "TopKGate" and not gate.attrs.scaled


class _Workspace(NamedTuple):
    """One thread's buffers for one batch size, all made on the first call: slots, gate switches, per step its
    output views and its input list (views of earlier steps' outputs, fixed; the positions that take a graph
    input are filled at each call, see ``feed_positions``), every step output's view by name, and the
    LayerStats of steps whose accounting never changes (dense steps)."""

    n: int
    slots: list[np.ndarray]
    switches: dict[int, np.ndarray]
    outs: list[list[np.ndarray]]
    ins: list[list[np.ndarray | None]]
    #: (step index, input position, graph input name) of every step input that is a graph input.
    feed_positions: tuple[tuple[int, int, str], ...]
    views: dict[str, np.ndarray]
    fixed_stats: list[LayerStats | None]


class Model:
    """A loaded model. Call it: ``model(x)`` / ``model.run(x, threshold=..., keep=...)``."""

    def __init__(self, model_file: ModelFile, graph: Graph, plan: Plan, threads: int | None = None,
                 reload: Callable[[], ModelFile] | None = None) -> None:
        """reload: reads the model file again. Given, the Model drops its references to the file's weight arrays:
        the plan's kernels hold every weight they need (BN-folded copies, packed layouts), so keeping the
        originals too would nearly double the model's memory. ``model_file``/``graph`` then read the file again
        on first use (the weights checksum and exports need them; running does not)."""
        if reload is not None:
            model_file = replace(model_file, weights={})
            graph = replace(graph, model=model_file, nodes=tuple(replace(n, weights={}) for n in graph.nodes))
        self._file = model_file
        self._graph = graph
        self._reload = reload
        self._reloaded: tuple[ModelFile, Graph] | None = None
        self._plan = plan
        self._threads = threads
        # The run's compute threads: the asked-for count, else the default (CPUs, or the board's setting).
        self._compute_threads = threads if threads is not None else thread_control.default_threads()
        self._local = threading.local()
        self._infos = _step_infos(plan)
        thread_control.openblas()  # finds the BLAS (cached) at load time, not in the first call's latency

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
    def source(self) -> str:
        """Where the model came from (a path, or "<memory>")."""
        return self._file.source

    @property
    def graph(self) -> Graph:
        """The validated graph, weights included (read again from the file when the load released them)."""
        return self._with_weights()[1]

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def model_file(self) -> ModelFile:
        """Everything in the model file, weights included (read again from the file when the load released them)."""
        return self._with_weights()[0]

    def _with_weights(self) -> tuple[ModelFile, Graph]:
        if self._reload is None:
            return self._file, self._graph
        if self._reloaded is None:
            model_file = self._reload()
            self._reloaded = (model_file, Graph.from_model_file(model_file))
        return self._reloaded

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
                raise InputError(f"inputs must be exactly {[s.name for s in specs]}; missing {missing}, "
                                 f"unknown {extra}")
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

    def _workspace(self, n: int) -> _Workspace:
        ws = getattr(self._local, "workspace", None)
        if ws is None or ws.n != n:
            ws = self._new_workspace(n)
            self._local.workspace = ws
        return ws

    def _new_workspace(self, n: int) -> _Workspace:
        """One flat float32 buffer per slot, sized for batch n, with every step's output views cut from it."""
        plan = self._plan
        slots = [np.empty(n * e, dtype=np.float32) for e in plan.slot_elements]
        outs, ins, fixed, switches = [], [], [], {}
        views: dict[str, np.ndarray] = {}
        feed_positions = []
        for i, (step, info) in enumerate(zip(plan.steps, self._infos)):
            step_ins: list[np.ndarray | None] = []
            for j, t in enumerate(step.inputs):
                if t in views:
                    step_ins.append(views[t])
                else:  # a graph input: plan order puts every producer before its consumers
                    step_ins.append(None)
                    feed_positions.append((i, j, t))
            ins.append(step_ins)
            step_outs = []
            for t in step.outputs:
                shape = plan.shapes[t]
                size = int(np.prod(shape, dtype=np.int64))
                step_outs.append(slots[plan.slot_of[t]][: n * size].reshape((n, *shape)))
                views[t] = step_outs[-1]
            outs.append(step_outs)
            stats = None
            if step.is_gate:
                switches[i] = np.empty_like(step_outs[0])
                stats = LayerStats(step.name, step.op_type, 0.0, 0, step.macs * n, step.macs * n, False)
            elif info.static_dense:
                macs = (step.macs + step.epilogue_macs) * n
                stats = LayerStats(step.name, step.op_type, step.out_shapes[0][0], step.out_shapes[0][0], macs, macs,
                                   False)
            elif not step.is_conv and step.macs + step.epilogue_macs:
                macs = (step.macs + step.epilogue_macs) * n
                stats = LayerStats(step.name, step.op_type, 0.0, 0, macs, macs, False)
            fixed.append(stats)
        return _Workspace(n, slots, switches, outs, ins, tuple(feed_positions), views, fixed)

    def _execute(self, feeds: dict[str, np.ndarray], n: int, threshold: float | None, keep: float | None,
                 capture: bool = False) -> tuple[Mapping[str, np.ndarray], list[LayerStats]]:
        """Run every step; returns the live tensors (copies of all of them when capture) and layer stats."""
        plan = self._plan
        ws = self._workspace(n)
        plan.context.threads = self._compute_threads
        thread_control.apply(self._compute_threads)
        step_ins = ws.ins
        for i, j, name in ws.feed_positions:
            step_ins[i][j] = feeds[name]
        tensors = ws.views  # every step output's view: fixed per workspace, read-only here
        captured: dict[str, np.ndarray] = dict(feeds)
        # Per tensor: absent/None (any channel may be non-zero) or per image the channels that may be non-zero.
        nonzero: dict[str, list[np.ndarray] | None] = {}
        # Per mask tensor: its active channel lists, computed once per call (a mask gates several steps).
        actives: dict[str, list[np.ndarray]] = {}
        layers: list[LayerStats] = []
        try:
            for step, info, ins, outs, fixed in zip(plan.steps, self._infos, step_ins, ws.outs, ws.fixed_stats):
                if info.kind == KIND_DENSE:
                    step.kernel(ins, outs)
                elif info.kind == KIND_GATE:
                    switches = ws.switches[info.index]
                    step.kernel(ins, [switches])
                    gates.mask_from_switches(step.op_type, step.attrs, switches, threshold, keep, out=outs[0])
                elif info.kind == KIND_GATED_CONV:
                    # Captured tensors are whole: a capturing call writes every tensor in the full layout.
                    layers.append(self._gated_conv(step, ins, outs, n, tensors, nonzero, actives,
                                                   info.compact_in and not capture, info.compact_out and not capture))
                else:
                    if not (info.mask_is_identity_when_linked
                            and nonzero.get(step.inputs[0]) is _active(step.inputs[1], tensors, actives)):
                        step.kernel(ins, outs)
                    if info.zero_rule != ZERO_NONE:
                        nonzero[step.outputs[0]] = _propagate_zero(step, info.zero_rule, nonzero, tensors, actives)
                if fixed is not None:
                    layers.append(fixed)
                if capture:
                    for t, arr in zip(step.outputs, outs):
                        captured[t] = arr.copy()
        finally:
            for i, j, _ in ws.feed_positions:  # the workspace keeps no reference to the caller's arrays
                step_ins[i][j] = None
        return (captured if capture else ChainMap(feeds, tensors)), layers

    @staticmethod
    def _gated_conv(step: Step, ins: list[np.ndarray], outs: list[np.ndarray], n: int,
                    tensors: Mapping[str, np.ndarray], nonzero: dict[str, list[np.ndarray] | None],
                    actives: dict[str, list[np.ndarray]], compact_in: bool = False,
                    compact_out: bool = False) -> LayerStats:
        """Run a conv that gating may reach, with its active channel lists (and channel-compact input/output
        where _compact_layouts allows it); its LayerStats for this call."""
        active_out = _active(step.gate_mask, tensors, actives) if step.gate_mask else None
        active_in = nonzero.get(step.inputs[0])
        if active_out is None and active_in is None:
            step.kernel(ins, outs)
        elif compact_in or compact_out:
            step.kernel(ins, outs, active_out=active_out, active_in=active_in, compact_in=compact_in,
                        compact_out=compact_out)
        else:
            step.kernel(ins, outs, active_out=active_out, active_in=active_in)
        k = step.out_shapes[0][0]
        executed = on_total = 0  # one plain loop, no generators: this runs for every gated conv of every call
        for b in range(n):
            out_b = None if active_out is None else active_out[b]
            executed += _conv_macs(step, out_b, None if active_in is None else active_in[b])
            if out_b is not None:
                on_total += len(out_b)
        on = k if active_out is None else on_total / n
        # The fused epilogue (folded BN, activation) runs on the computed channels only.
        executed += round(step.epilogue_macs * n * on / k)
        nonzero[step.outputs[0]] = active_out
        return LayerStats(step.name, step.op_type, on, k, executed, (step.macs + step.epilogue_macs) * n,
                          step.gate_mask is not None)


def _active(mask: str, tensors: Mapping[str, np.ndarray], actives: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    """The active channel lists of mask tensor ``mask`` (computed on first use in this call)."""
    found = actives.get(mask)
    if found is None:
        found = actives[mask] = gates.active_channels(tensors[mask])
    return found


def _propagate_zero(step: Step, rule: int, nonzero: Mapping[str, list[np.ndarray] | None],
                    tensors: Mapping[str, np.ndarray], actives: dict[str, list[np.ndarray]]) -> list[np.ndarray] | None:
    if rule == ZERO_MASK:
        on = _active(step.inputs[1], tensors, actives)
        before = nonzero.get(step.inputs[0])
        if before is None or before is on:
            return on  # the common case: the conv before the mask was gated by this very mask
        return [a if a is b else np.intersect1d(a, b, assume_unique=True) for a, b in zip(on, before)]
    if rule == ZERO_PASS:
        return nonzero.get(step.inputs[0])
    if rule == ZERO_CONCAT and all(nonzero.get(t) is not None for t in step.inputs):
        parts, offset = None, 0
        for t, shape in zip(step.inputs, step.in_shapes):
            sets = nonzero[t]
            shifted = [s + offset for s in sets]  # type: ignore[union-attr]
            parts = shifted if parts is None else [np.concatenate([a, b]) for a, b in zip(parts, shifted)]
            offset += shape[0]
        return parts
    return None

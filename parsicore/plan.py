"""Graph -> Plan: BatchNorm folding, activation fusion (into Conv, Gemm, Add, Mul), kernels built per backend,
gate links, buffer slots.

A Plan is frozen: many threads may run it at once; per-call buffers live in the runtime's workspace.

Gate links: for a ``ChannelMask(x, mask)`` the planner walks back from ``x`` through single-consumer
channel-wise steps (BN, activations, pooling) to a Conv. That conv then computes only the channels the
mask keeps (``active_out``); the channels it skips are zero, then masked to zero anyway, so the result
equals dense compute followed by the mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from parsicore.errors import GraphError
from parsicore.graph import Graph, Node
from parsicore.kernels import factories
from parsicore.kernels.base import Activation, Kernel, KernelContext, KernelSpec
from parsicore.ops.base import Shape


@dataclass(frozen=True)
class Step:
    """One kernel call. ``nodes`` are the graph nodes it stands for (a conv plus folded BN and activation)."""

    name: str
    op_type: str
    nodes: tuple[str, ...]
    kernel: Kernel = field(repr=False, compare=False)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    attrs: Any
    macs: int  # dense, per image, of the op itself
    #: Dense MACs per image of folded/fused nodes (BN, activation): they run on active channels only.
    epilogue_macs: int = 0
    #: Mask tensor whose non-zero channels are the only output channels this conv must compute.
    gate_mask: str | None = None
    #: The set of channels known to be zero passes from input 0 to the output.
    passes_zero: bool = False
    is_gate: bool = False
    is_conv: bool = False
    #: Conv geometry for MAC accounting: Ho*Wo*kh*kw, groups, in channels.
    conv_unit: int = 0
    conv_groups: int = 1
    conv_in_channels: int = 0


@dataclass(frozen=True)
class Plan:
    """Steps in execution order plus buffer slots: tensor -> slot id, slot -> elements per image."""

    steps: tuple[Step, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: Mapping[str, Shape]
    slot_of: Mapping[str, int]
    slot_elements: tuple[int, ...]
    backend: str
    dense_macs: int
    #: Shared by the plan's kernels: per-thread scratch memory and the thread budget of the current run.
    context: KernelContext = field(default_factory=KernelContext, compare=False, repr=False)

    @property
    def gated_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.gate_mask is not None)


@dataclass
class _Draft:
    node: Node
    weights: dict[str, np.ndarray]
    activation: Activation | None = None
    out: tuple[str, ...] = ()
    names: list[str] = field(default_factory=list)
    macs: int = 0
    epilogue_macs: int = 0
    removed: bool = False


def _activation_of(node: Node) -> Activation | None:
    to_act = getattr(node.op, "to_activation", None)
    return to_act(node.attrs) if to_act else None


def _fuse_activation(d: _Draft, nxt: Node | None, draft_of: Mapping[str, _Draft]) -> None:
    """Fold ``nxt`` into draft ``d`` as its epilogue when it is an element-wise activation (d's sole consumer)."""
    act = _activation_of(nxt) if nxt is not None else None
    if act is None:
        return
    d.activation = act
    d.out, d.names = nxt.outputs, d.names + [nxt.name]  # type: ignore[union-attr]
    d.epilogue_macs += nxt.macs  # type: ignore[union-attr]
    draft_of[nxt.name].removed = True  # type: ignore[union-attr]


def build_plan(graph: Graph, backend: str, fold: bool = True, release_folded: bool = False) -> Plan:
    """Build the executable plan of ``graph`` for ``backend``. ``fold=False`` keeps BN/activations separate.

    release_folded: the caller owns ``graph`` and its model file and drops them after planning (parsicore.load):
    each conv's and BatchNorm's weight dict is emptied as soon as the folded copy exists, so the original
    arrays are freed one layer at a time instead of living beside all the folded ones until the end."""
    table = factories(backend)
    consumers = graph.consumers()
    model_outputs = set(graph.outputs)
    drafts = [_Draft(n, dict(n.weights), out=n.outputs, names=[n.name], macs=n.macs) for n in graph.nodes]
    by_output = {t: d for d in drafts for t in d.node.outputs}

    def sole_consumer(tensor: str) -> Node | None:
        users = consumers.get(tensor, [])
        if len(users) == 1 and tensor not in model_outputs:
            return users[0]
        return None

    if fold:
        from parsicore.ops.batchnorm import fold_into_conv

        draft_of = {d.node.name: d for d in drafts}
        for d in drafts:
            if d.node.type in ("Add", "Mul") and not d.removed:
                # A residual Add's ReLU runs in the Add's own pass (one pass over the tensor instead of two).
                _fuse_activation(d, sole_consumer(d.out[0]), draft_of)
                continue
            if d.node.type not in ("Conv", "Gemm") or d.removed:
                continue
            nxt = sole_consumer(d.out[0])
            if nxt is not None and nxt.type == "BatchNorm":
                w = d.weights["weight"]
                w4 = w if w.ndim == 4 else w[:, :, None, None]
                try:
                    fw, fb = fold_into_conv(w4, d.weights.get("bias"), nxt.weights["scale"], nxt.weights["bias"],
                                            nxt.weights["mean"], nxt.weights["var"], nxt.attrs.epsilon)
                except ValueError as e:
                    raise GraphError(f"{graph.source}: node {nxt.name!r} (BatchNorm): {e}") from e
                d.weights["weight"] = fw if w.ndim == 4 else fw[:, :, 0, 0]
                d.weights["bias"] = fb
                if release_folded:
                    for folded in (d.node.weights, nxt.weights):
                        if isinstance(folded, dict):
                            folded.clear()
                del w, w4
                d.out, d.names = nxt.outputs, d.names + [nxt.name]
                d.epilogue_macs += nxt.macs
                draft_of[nxt.name].removed = True
            _fuse_activation(d, sole_consumer(d.out[0]), draft_of)
    kept = [d for d in drafts if not d.removed]

    context = KernelContext()
    steps: list[Step] = []
    for d in kept:
        n = d.node
        out_shapes = tuple(graph.shapes[t] for t in d.out)
        spec = KernelSpec(n.type, n.attrs, d.weights, n.in_shapes, out_shapes, d.activation, name=n.name,
                          context=context)
        try:
            kernel = table[n.type](spec)
        except ValueError as e:
            raise GraphError(f"{graph.source}: node {n.name!r} ({n.type}): {e}") from e
        passes = n.op.channelwise and n.op.keeps_zero_for(n.attrs)
        step = Step(
            name=n.name, op_type=n.type, nodes=tuple(d.names), kernel=kernel, inputs=n.inputs, outputs=d.out,
            in_shapes=n.in_shapes, out_shapes=out_shapes, attrs=n.attrs, macs=d.macs, epilogue_macs=d.epilogue_macs,
            passes_zero=passes,
            is_gate=n.op.is_gate, is_conv=n.type == "Conv",
        )
        if n.type == "Conv":
            k, cg, kh, kw = d.weights["weight"].shape
            ho, wo = out_shapes[0][1], out_shapes[0][2]
            step = replace(step, conv_unit=ho * wo * kh * kw, conv_groups=n.attrs.groups,
                           conv_in_channels=n.in_shapes[0][0])
        steps.append(step)

    steps = _link_gates(steps, consumers, model_outputs, by_output)
    slot_of, slot_elements = _assign_slots(steps, graph)
    return Plan(tuple(steps), graph.inputs, graph.outputs, dict(graph.shapes), slot_of, slot_elements, backend,
                graph.total_macs, context)


def _link_gates(steps: list[Step], consumers: Mapping[str, list[Node]], model_outputs: set[str],
                by_output: Mapping[str, Any]) -> list[Step]:
    index_of_output = {t: i for i, s in enumerate(steps) for t in s.outputs}
    result = list(steps)
    for s in steps:
        if s.op_type != "ChannelMask":
            continue
        x, mask = s.inputs
        mask_step = index_of_output.get(mask)
        t = x
        while t in index_of_output:
            i = index_of_output[t]
            users = consumers.get(t, [])
            if len(users) != 1 or t in model_outputs:
                break
            producer = result[i]
            if producer.is_conv:
                # The mask must exist before the conv runs; a gate reading this conv's own output cannot skip it.
                if mask_step is not None and mask_step < i and producer.gate_mask is None:
                    result[i] = replace(producer, gate_mask=mask)
                break
            channelwise = producer.op_type != "ChannelMask" and _is_channelwise(producer)
            if not channelwise:
                break
            t = producer.inputs[0]
    return result


def _is_channelwise(step: Step) -> bool:
    from parsicore.ops import OPS

    return OPS[step.op_type].channelwise and len(step.inputs) == 1


def _masks_in_place(step: Step, index: int, last_use: Mapping[str, int], slot_of: Mapping[str, int],
                    graph: Graph) -> bool:
    """A ChannelMask whose input is read by nothing after it writes its output over its input (same slot):
    when the conv before it was gated by the same hard mask, that input already is the masked tensor and the
    runtime skips the step (see runtime._StepInfo.mask_is_identity_when_linked)."""
    if step.op_type != "ChannelMask":
        return False
    x = step.inputs[0]
    return x in slot_of and last_use.get(x) == index and x not in graph.outputs and step.inputs[1] != x


def _assign_slots(steps: list[Step], graph: Graph) -> tuple[dict[str, int], tuple[int, ...]]:
    """Greedy liveness-based reuse: a tensor's slot is freed after its last reader runs; a ChannelMask may
    write in place (see _masks_in_place)."""
    last_use: dict[str, int] = {}
    for i, s in enumerate(steps):
        for t in s.inputs:
            last_use[t] = i
    for t in graph.outputs:
        last_use[t] = len(steps)
    sizes: list[int] = []
    free: list[int] = []
    slot_of: dict[str, int] = {}
    for i, s in enumerate(steps):
        in_place = _masks_in_place(s, i, last_use, slot_of, graph)
        if in_place:
            slot_of[s.outputs[0]] = slot_of[s.inputs[0]]
        for t in () if in_place else s.outputs:
            need = int(np.prod(graph.shapes[t], dtype=np.int64))
            # Best fit among free slots; grow the largest free slot if none fits.
            fitting = [j for j in free if sizes[j] >= need]
            if fitting:
                j = min(fitting, key=lambda j: sizes[j])
            elif free:
                j = max(free, key=lambda j: sizes[j])
                sizes[j] = need
            else:
                sizes.append(need)
                j = len(sizes) - 1
                free.append(j)
            free.remove(j)
            slot_of[t] = j
        for t in set(s.inputs) | set(s.outputs):
            if in_place and t == s.inputs[0]:
                continue  # the slot now holds the output
            if t in slot_of and last_use.get(t, -1) <= i and t not in graph.outputs:
                if slot_of[t] not in free:
                    free.append(slot_of[t])
    return slot_of, tuple(sizes)

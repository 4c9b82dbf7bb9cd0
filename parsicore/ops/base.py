"""The contract every op follows: typed attributes, shape and MAC rules, and a naive reference.

An op type is one :class:`OpDef` instance in the table of :mod:`parsicore.ops`. It holds no state.

Conventions shared by every op:
- Tensors are float32. Image-like tensors are NCHW ``(N, C, H, W)``; vectors are ``(N, F)``.
- The batch dimension N is dynamic: shape rules (``infer``) see and return *feature shapes*, i.e. the
  shape without N (``(C, H, W)`` or ``(F,)``). References see whole arrays including N.
- Attributes are parsed from the model file into the op's frozen dataclass by :func:`parse_attrs`,
  which checks names and types; the dataclass's ``check()`` checks ranges. Both raise ``ValueError``
  with a short message; the graph wraps it into a :class:`~parsicore.errors.GraphError` naming the node.
- ``reference`` is the naive, obviously-correct computation (plain loops where it matters). Only tests
  and the ``reference`` backend call it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Attrs:
    """Base of every op's attribute dataclass. Subclasses add fields with defaults and may override check()."""

    def check(self) -> None:
        """Raise ValueError when an attribute is out of range."""


@dataclass(frozen=True)
class NoAttrs(Attrs):
    """Attributes of ops that take none."""


_SCALARS: dict[Any, type] = {int: int, float: float, str: str, bool: bool}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a JSON value to the type named by ``hint`` or raise ValueError."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0])
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"attribute {name!r} must be a list, got {type(value).__name__}")
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, v, item) for v in value)
        if len(value) != len(args):
            raise ValueError(f"attribute {name!r} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"attribute {name!r} must be a boolean, got {value!r}")
        return bool(value)
    if hint is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"attribute {name!r} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"attribute {name!r} must be a number, got {value!r}")
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"attribute {name!r} must be finite, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"attribute {name!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported attribute type {hint!r} for {name!r}")  # a bug in an op definition


def parse_attrs(cls: type[Attrs], raw: Mapping[str, Any]) -> Attrs:
    """Build ``cls`` from a JSON mapping: unknown names, wrong types and out-of-range values raise ValueError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(unknown)}")
    values = {name: _coerce(name, value, hints[name]) for name, value in raw.items()}
    attrs = cls(**values)
    attrs.check()
    return attrs


def attrs_to_json(attrs: Attrs) -> dict[str, Any]:
    """The JSON form of an attribute dataclass (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(attrs):
        value = getattr(attrs, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


class OpDef:
    """One op type. Subclasses set the class variables and implement infer/macs/reference.

    Class variables:
        type: the op type name stored in model files (e.g. ``"Conv"``).
        attrs: the frozen attribute dataclass.
        num_inputs: (min, max) number of graph inputs (tensors, not weights).
        num_outputs: number of outputs (1 for every op today).
        weights: required weight names; optional_weights: weight names that may be absent.
        channelwise: output channel c depends only on input channel c of the first input, with the same
            channel count (BN, activations, pooling, masks). Lets the planner walk from a mask back to the
            conv whose output channels it switches off.
        keeps_zero: channelwise and an all-zero input channel gives an all-zero output channel, so the
            set of channels known to be zero passes through (ReLU, pooling; not Sigmoid, not BatchNorm).
        is_gate: computes switches/saliencies for a ChannelMask (LKAMGate, TopKGate).
    """

    type: ClassVar[str] = ""
    attrs: ClassVar[type[Attrs]] = NoAttrs
    num_inputs: ClassVar[tuple[int, int]] = (1, 1)
    num_outputs: ClassVar[int] = 1
    weights: ClassVar[tuple[str, ...]] = ()
    optional_weights: ClassVar[tuple[str, ...]] = ()
    channelwise: ClassVar[bool] = False
    keeps_zero: ClassVar[bool] = False
    is_gate: ClassVar[bool] = False

    def infer(self, attrs: Any, in_shapes: Sequence[Shape], weights: Mapping[str, Shape]) -> list[Shape]:
        """Output feature shapes from input feature shapes and weight shapes; ValueError when inconsistent."""
        raise NotImplementedError

    def macs(self, attrs: Any, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             weights: Mapping[str, Shape]) -> int:
        """Multiply-accumulates per image for a dense run (0 for ops without a meaningful count)."""
        return 0

    def reference(self, attrs: Any, inputs: Sequence[np.ndarray],
                  weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Naive computation on whole float32 arrays (batch included)."""
        raise NotImplementedError

    def keeps_zero_for(self, attrs: Any) -> bool:
        """Whether an all-zero input channel stays all-zero with these attributes (ops refine the class var)."""
        return self.keeps_zero


def require_rank(shape: Shape, rank: int, what: str = "input") -> None:
    """Raise ValueError unless the feature shape has ``rank`` dimensions."""
    if len(shape) != rank:
        raise ValueError(f"{what} must have {rank + 1} dimensions (N + {rank}), got feature shape {shape}")


def require_weight_shape(weights: Mapping[str, Shape], name: str, expected: Shape) -> None:
    """Raise ValueError unless weight ``name`` has shape ``expected``."""
    got = tuple(weights[name])
    if got != tuple(expected):
        raise ValueError(f"weight {name!r} has shape {got}, expected {tuple(expected)}")

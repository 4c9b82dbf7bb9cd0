"""The one explicit table of op types the engine runs.

Each module below holds one op family and exposes ``OPS``, a tuple of :class:`~parsicore.ops.base.OpDef`
instances; backends have a module of the same stem exposing ``FACTORIES``.
"""

from __future__ import annotations

from parsicore.ops import (
    activation,
    batchnorm,
    concat,
    conv,
    elementwise,
    gates,
    gemm,
    pad,
    pool,
    shape,
    softmax,
)
from parsicore.ops.base import OpDef

#: Op families, by module stem (backends and tests mirror these stems).
FAMILIES = {
    "activation": activation,
    "batchnorm": batchnorm,
    "concat": concat,
    "conv": conv,
    "elementwise": elementwise,
    "gates": gates,
    "gemm": gemm,
    "pad": pad,
    "pool": pool,
    "shape": shape,
    "softmax": softmax,
}

#: Op type name -> definition.
OPS: dict[str, OpDef] = {op.type: op for family in FAMILIES.values() for op in family.OPS}

__all__ = ["FAMILIES", "OPS", "OpDef"]

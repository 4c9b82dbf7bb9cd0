"""parsicore: CNN inference on embedded CPUs with parsimonious (gated) inference.

    import parsicore
    model = parsicore.load("model.h5")        # or parsicore.load() for the shipped default model
    probs = model(x)                          # x: float32 (N, C, H, W)
    model.last_stats.macs_fraction            # how much of the network ran
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from parsicore.errors import (
    BackendError,
    ConversionError,
    GraphError,
    ImageError,
    InputError,
    ModelFormatError,
    ParsicoreError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from parsicore.api import default_model_path, load
    from parsicore.runtime import Model, RunStats


def __getattr__(name: str) -> Any:
    # load/Model/RunStats/default_model_path import numpy, so `import parsicore` (and the CLI, and
    # parsicore.boards.configure()) must not: OpenBLAS reads OPENBLAS_CORETYPE and its thread count when
    # numpy is first imported, and the board settings have to be in the environment before that.
    if name in ("load", "default_model_path"):
        from parsicore import api

        return getattr(api, name)
    if name in ("Model", "RunStats"):
        from parsicore import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'parsicore' has no attribute {name!r}")

__all__ = [
    "BackendError",
    "ConversionError",
    "GraphError",
    "ImageError",
    "InputError",
    "Model",
    "ModelFormatError",
    "ParsicoreError",
    "RunStats",
    "UnsupportedOpError",
    "__version__",
    "default_model_path",
    "load",
]

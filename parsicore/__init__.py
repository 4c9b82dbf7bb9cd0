"""parsicore: CNN inference on embedded CPUs with parsimonious (gated) inference.

    import parsicore
    model = parsicore.load("model.h5")        # or parsicore.load() for the shipped default model
    probs = model(x)                          # x: float32 (N, C, H, W)
    model.last_stats.macs_fraction            # how much of the network ran
"""

from __future__ import annotations

from parsicore.api import default_model_path, load
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
from parsicore.runtime import Model, RunStats

__version__ = "0.1.0"

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

"""The public entry points: load a model from a path (or a ModelFile) for a backend."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from parsicore.errors import BackendError, InputError
from parsicore.format import ModelFile, read_model
from parsicore.graph import Graph
from parsicore.kernels import BACKENDS, default_backend
from parsicore.plan import build_plan
from parsicore.runtime import Model

DEFAULT_MODEL = "fashion_gated.h5"


def weights_dir() -> Path:
    """The shipped weights/ directory: package data ``parsicore/weights`` once installed, else the checkout's."""
    installed = Path(str(resources.files("parsicore"))) / "weights"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "weights"


def default_model_path() -> Path:
    """Path of the shipped default gated model."""
    return weights_dir() / DEFAULT_MODEL


def load(path: str | os.PathLike[str] | ModelFile | None = None, backend: str | None = None,
         threads: int | None = None, fold: bool = True) -> Model:
    """Load, validate and plan a model. ``path`` None loads the shipped default model.

    backend: "numba" (default when importable), "numpy" or "reference". threads: compute threads (None:
    the library defaults). fold=False keeps BatchNorm and activations as separate steps (for tests).
    Raises ModelFormatError/GraphError/UnsupportedOpError for a bad model, BackendError, InputError.
    """
    if backend is None:
        backend = os.environ.get("PARSICORE_BACKEND") or default_backend()
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    model_file = path if isinstance(path, ModelFile) else read_model(default_model_path() if path is None else path)
    graph = Graph.from_model_file(model_file)
    plan = build_plan(graph, backend, fold=fold)
    return Model(model_file, graph, plan, threads=threads)

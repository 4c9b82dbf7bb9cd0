"""The public entry points: load a model from a path (or a ModelFile) for a backend."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

from parsicore.errors import BackendError, InputError, ModelFormatError
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
    if isinstance(path, ModelFile):
        model_file, reload = path, None  # the caller holds its arrays anyway: nothing to release
    else:
        file_path = Path(default_model_path() if path is None else path)
        stamp = _stamp(file_path)
        model_file = read_model(file_path)
        reload = functools.partial(_read_again, file_path, stamp)
    graph = Graph.from_model_file(model_file)
    plan = build_plan(graph, backend, fold=fold, release_folded=reload is not None)
    return Model(model_file, graph, plan, threads=threads, reload=reload)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None  # read_model reports the missing file
    return st.st_size, st.st_mtime_ns


def _read_again(path: Path, stamp: tuple[int, int] | None) -> ModelFile:
    """The model file read again for Model.model_file/graph; ModelFormatError if it changed since the load."""
    if _stamp(path) != stamp:
        raise ModelFormatError(f"{path}: the file changed since the model was loaded; load it again")
    return read_model(path)

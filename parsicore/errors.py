"""Typed errors raised at parsicore's edges.

Every error's ``str()`` is one line that names the file, node, tensor or value at fault, so the CLI can
print it as-is (exit code 2) and an embedding application can show it to a person.

Hierarchy::

    ParsicoreError
      ModelFormatError          the model file is unreadable or inconsistent
        UnsupportedOpError      an op type the engine does not know
        GraphError              a graph that cannot run (cycle, undefined tensor, bad shapes)
      InputError                an input array or run-time option the model cannot take
      ImageError                an image that cannot be decoded or is unsafe to decode
      BackendError              a backend that is unknown or unavailable here
      ConversionError           a framework model that cannot be converted (importers, exporters)
"""

from __future__ import annotations


class ParsicoreError(Exception):
    """Base class of every error parsicore raises on purpose."""

    def __str__(self) -> str:
        # One line, always: multi-line messages break the CLI's one-line contract.
        return " ".join(super().__str__().split())


class ModelFormatError(ParsicoreError):
    """The model file is missing, truncated, of another format version, or internally inconsistent."""


class UnsupportedOpError(ModelFormatError):
    """A node uses an op type the engine does not implement."""


class GraphError(ModelFormatError):
    """The graph cannot run: a cycle, an undefined tensor, inconsistent shapes or weights."""


class InputError(ParsicoreError):
    """An input array (shape, dtype, values) or a run-time option (threshold, keep ratio) is invalid."""


class ImageError(ParsicoreError):
    """An image file cannot be read, is truncated, is not an image, or is a decompression bomb."""


class BackendError(ParsicoreError):
    """A compute backend is unknown or cannot be used on this machine."""


class ConversionError(ParsicoreError):
    """A framework model (PyTorch, ONNX) cannot be converted to the parsicore format."""


__all__ = [
    "BackendError",
    "ConversionError",
    "GraphError",
    "ImageError",
    "InputError",
    "ModelFormatError",
    "ParsicoreError",
    "UnsupportedOpError",
]

"""ModelBuilder: create parsicore models programmatically (tests, exporters and importers use it).

Example::

    b = ModelBuilder("tiny", license="MIT", producer="my script")
    b.add_input("image", (None, 1, 28, 28))
    b.add_node("Conv", ["image"], ["c1"], name="conv1", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": w, "bias": bias})
    b.add_node("Relu", ["c1"], ["r1"])
    b.add_output("r1")
    b.save("tiny.h5")          # validated by loading it back through the graph layer first

``build()`` returns the in-memory :class:`~parsicore.format.ModelFile`; ``parsicore.load`` accepts it
too, so tests can run a model without touching the disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from parsicore.format import ModelFile, NodeSpec, TensorSpec, write_model

COLOUR_MODES = ("L", "RGB", "BGR")
RESIZE_POLICIES = ("stretch", "short_side_crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class ModelBuilder:
    """Accumulates inputs, nodes, weights and metadata; ``build()``/``save()`` produce the model."""

    def __init__(self, name: str, description: str = "", license: str = "", producer: str = "") -> None:
        self._inputs: list[TensorSpec] = []
        self._outputs: list[str] = []
        self._nodes: list[NodeSpec] = []
        self._weights: dict[str, dict[str, np.ndarray]] = {}
        self._metadata: dict[str, Any] = {
            "name": name, "description": description, "license": license, "producer": producer,
        }
        self._selftest: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        self._counter = 0

    def set_metadata(self, **fields: Any) -> None:
        """Set extra JSON-serialisable metadata fields (e.g. ``training``, ``accuracy``)."""
        self._metadata.update({k: _jsonable(v) for k, v in fields.items()})

    def set_labels(self, labels: Sequence[str]) -> None:
        """Class labels, index i naming output i."""
        self._metadata["labels"] = [str(label) for label in labels]

    def set_preprocessing(
        self,
        input_size: tuple[int, int],
        colour: str = "RGB",
        resize: str = "stretch",
        resize_short: int | None = None,
        interpolation: str = "bilinear",
        value_range: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        """How an image becomes the input tensor (see FORMAT.md, "preprocessing").

        Pixels 0..255 map linearly to ``value_range``, then ``(x - mean) / std`` per channel. ``resize``:
        ``stretch`` resizes straight to input_size; ``short_side_crop`` resizes the short side to
        ``resize_short`` keeping the aspect ratio, then centre-crops input_size.
        """
        if colour not in COLOUR_MODES:
            raise ValueError(f"colour must be one of {COLOUR_MODES}")
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        self._metadata["preprocessing"] = {
            "input_size": [int(input_size[0]), int(input_size[1])],
            "colour": colour,
            "resize": resize,
            "resize_short": None if resize_short is None else int(resize_short),
            "interpolation": interpolation,
            "value_range": [float(value_range[0]), float(value_range[1])],
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        }

    def add_input(self, name: str, shape: Sequence[int | None]) -> str:
        """Declare a model input; the batch dimension first, None (dynamic)."""
        self._inputs.append(TensorSpec(name, tuple(None if i == 0 else int(d) for i, d in enumerate(shape))))  # type: ignore[arg-type]
        return name

    def add_node(
        self,
        op: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | None = None,
        name: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        weights: Mapping[str, np.ndarray | None] | None = None,
    ) -> str:
        """Append a node; returns its (first) output tensor name. Weights that are None are left out."""
        self._counter += 1
        node_name = name or f"{op.lower()}_{self._counter}"
        outs = list(outputs) if outputs else [f"{node_name}:0"]
        clean_attrs = {k: _jsonable(v) for k, v in (attrs or {}).items()}
        self._nodes.append(NodeSpec(node_name, op, tuple(inputs), tuple(outs), clean_attrs))
        if weights:
            arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items() if v is not None}
            if arrays:
                self._weights[node_name] = arrays
        return outs[0]

    def add_output(self, name: str) -> None:
        """Declare a model output tensor."""
        self._outputs.append(name)

    def set_selftest(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Embed a self-test vector: inputs and the producer framework's outputs for them."""
        self._selftest = (
            {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()},
            {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()},
        )

    def build(self) -> ModelFile:
        """The in-memory model (not yet validated; ``parsicore.load`` validates)."""
        model = ModelFile(
            inputs=list(self._inputs),
            outputs=list(self._outputs),
            nodes=list(self._nodes),
            weights={k: dict(v) for k, v in self._weights.items()},
            metadata=dict(self._metadata),
            selftest_inputs=dict(self._selftest[0]),
            selftest_outputs=dict(self._selftest[1]),
        )
        from parsicore.checksum import weights_sha256

        model.metadata["weights_sha256"] = weights_sha256(model)
        return model

    def save(self, path: str | os.PathLike[str], float16: bool = False) -> ModelFile:
        """Validate (by building the graph) and write atomically; returns the ModelFile written."""
        from parsicore.graph import Graph

        model = self.build()
        if float16:
            # The file holds float16: checksum what will load back, not the float32 values.
            from parsicore.checksum import weights_sha256

            for arrays in model.weights.values():
                for key in arrays:
                    arrays[key] = arrays[key].astype(np.float16).astype(np.float32)
            model.metadata["weights_sha256"] = weights_sha256(model)
        Graph.from_model_file(model)  # raises a typed error before anything is written
        write_model(model, path, float16=float16)
        return model

"""Accuracy and executed compute of a model on a labelled set, over a list of gate thresholds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from parsicore.datasets import LabelledSet, batches
from parsicore.image import check_preprocessing, load_image, prepare_array
from parsicore.runtime import Model


@dataclass(frozen=True)
class EvalPoint:
    """Result at one threshold: top-1 accuracy, mean fraction of MACs executed, mean kernels on."""

    threshold: float | None
    accuracy: float
    macs_fraction: float  # every layer, gate banks included
    conv_macs_fraction: float  # conv layers only (no gates, no fc): the model card's "conv MACs executed"
    macs_executed: int
    macs_dense: int
    images: int


def evaluate(model: Model, data: LabelledSet, thresholds: Sequence[float | None], batch: int = 256,
             progress: Callable[[int], None] | None = None) -> list[EvalPoint]:
    """Run ``model`` over ``data`` once per threshold; ``progress(k)`` is told of k more images done."""
    pre = check_preprocessing(model.metadata.get("preprocessing"), model.source)
    points = []
    for threshold in thresholds:
        correct, executed, dense, conv_executed, conv_dense = 0, 0, 0, 0, 0
        for sl in batches(len(data), batch):
            if data.pixels is not None:
                x = np.concatenate([prepare_array(img, pre) for img in data.pixels[sl]])
            else:
                x = np.concatenate([load_image(path, pre) for path in data.paths[sl]])
            out, stats = model.run_with_stats(x, threshold=threshold)
            logits = next(iter(out.values())).reshape(x.shape[0], -1)
            correct += int((logits.argmax(axis=1) == data.labels[sl]).sum())
            executed += stats.macs_executed
            dense += stats.macs_dense
            conv_executed += sum(layer.macs_executed for layer in stats.layers if layer.op == "Conv")
            conv_dense += sum(layer.macs_dense for layer in stats.layers if layer.op == "Conv")
            if progress:
                progress(x.shape[0])
        points.append(EvalPoint(threshold, correct / len(data), executed / dense if dense else 1.0,
                                conv_executed / conv_dense if conv_dense else 1.0, executed, dense, len(data)))
    return points

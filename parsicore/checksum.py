"""A checksum of a model's weights, so a model copied to a board can be verified there."""

from __future__ import annotations

import hashlib

import numpy as np

from parsicore.format import ModelFile


def weights_sha256(model: ModelFile) -> str:
    """SHA-256 over every weight (node and name sorted; shape, then float32 little-endian bytes).

    float16-stored weights are hashed as the float32 values they load as, so the checksum of a model
    saved with ``float16=True`` must be computed after rounding (the builder does this via the saved file).
    """
    h = hashlib.sha256()
    for node in sorted(model.weights):
        for name in sorted(model.weights[node]):
            arr = np.ascontiguousarray(model.weights[node][name], dtype="<f4")
            h.update(f"{node}/{name}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()

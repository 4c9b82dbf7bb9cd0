"""Shared by the exporter tests: the gated model variants, a random input, and the output comparison."""

from __future__ import annotations

import numpy as np

from parsicore.format import ModelFile

#: Largest difference allowed, relative to the output scale (max |parsicore output|).
RTOL = 1e-4

#: gated_cnn keyword arguments per variant: both gate kinds and modes, one bank 3x3, ties in top-k.
GATED_VARIANTS: dict[str, dict[str, object]] = {
    "lkam-hard-2banks": {},
    "lkam-scaled-1bank-3x3": {"mode": "scaled", "two_banks": False, "gate_kernel": 3},
    "topk-scaled": {"gate": "topk"},
    "topk-hard": {"gate": "topk", "scaled": False, "keep_ratio": 0.3},
    "topk-ties": {"gate": "topk", "scaled": False, "offset": -50.0},  # every saliency relu'd to 0: all tie
}


def model_input(model_file: ModelFile, n: int, seed: int) -> np.ndarray:
    """float32 (n, *feature shape) standard normal input for the model's first input."""
    return np.random.default_rng(seed).standard_normal((n, *model_file.inputs[0].feature_shape)).astype(np.float32)


def assert_outputs_close(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    """Same output names and shapes, and every output within RTOL of the output scale."""
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        assert theirs[name].shape == value.shape, name
        scale = max(float(np.abs(value).max()), 1e-6)
        err = float(np.abs(theirs[name] - value).max()) / scale
        assert err <= RTOL, f"{name}: max error {err:.3g} of the output scale"

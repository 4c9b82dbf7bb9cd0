"""Model output -> probabilities -> top-k labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    prob: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits: float (N, K) -> probabilities (N, K), computed in float64 for stability."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def to_probabilities(output: np.ndarray, kind: str = "logits") -> np.ndarray:
    """(N, K[,1,1]) output -> (N, K) probabilities; kind 'probabilities' passes through."""
    flat = np.asarray(output).reshape(output.shape[0], -1)
    return flat.astype(np.float64) if kind == "probabilities" else softmax(flat)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """probs: (K,) -> the k most probable classes, highest first (ties: lower index first)."""
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    return [Prediction(labels[i] if i < len(labels) else str(i), int(i), float(probs[i])) for i in order]

"""Switches -> channel masks. The only place thresholds and keep ratios are applied.

Gate kernels compute raw switches (LKAM: sigmoid outputs in (0, 1); top-k: saliencies); this module
turns them into mask values the ChannelMask multiplies by, honouring a per-call override of the
threshold (LKAM) or keep ratio (top-k), and tells the runtime which channels are on.
"""

from __future__ import annotations

import numpy as np

from parsicore.errors import InputError
from parsicore.ops.gates import kept_count


def check_threshold(threshold: float | None) -> float | None:
    """InputError unless None or a finite number in [0, 1]."""
    if threshold is None:
        return None
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not (0.0 <= t <= 1.0):
        raise InputError(f"threshold must be in [0, 1], got {threshold!r}")
    return t


def check_keep(keep: float | None) -> float | None:
    """InputError unless None or a number in (0, 1]."""
    if keep is None:
        return None
    try:
        k = float(keep)
    except (TypeError, ValueError):
        raise InputError(f"keep ratio must be a number in (0, 1], got {keep!r}") from None
    if not (0.0 < k <= 1.0):
        raise InputError(f"keep ratio must be in (0, 1], got {keep!r}")
    return k


def lkam_mask(switches: np.ndarray, threshold: float, mode: str, out: np.ndarray | None = None) -> np.ndarray:
    """switches: float32 (N, K) in (0, 1) -> mask float32 (N, K): on iff s > threshold; hard 1/0, scaled s/0.
    out: float32 (N, K) to write the mask into (returned), else a new array."""
    if out is None:
        out = np.empty(switches.shape, dtype=np.float32)
    if mode == "scaled":
        out.fill(0.0)
        np.copyto(out, switches, where=switches > np.float32(threshold))
    else:
        np.greater(switches, np.float32(threshold), out=out)  # bool -> float32: 1.0 / 0.0
    return out


def topk_mask(saliency: np.ndarray, keep_ratio: float, scaled: bool) -> np.ndarray:
    """saliency: float32 (N, K) -> mask float32 (N, K) keeping the ceil(keep_ratio*K) largest per row.

    Ties keep the lower channel index (a stable sort on -saliency). Scaled keeps the saliency as the mask
    value, else 1.0.
    """
    n, k = saliency.shape
    keep = min(k, kept_count(keep_ratio, k))
    order = np.argsort(-saliency, axis=1, kind="stable")[:, :keep]
    mask = np.zeros_like(saliency, dtype=np.float32)
    rows = np.arange(n)[:, None]
    mask[rows, order] = saliency[rows, order] if scaled else np.float32(1.0)
    return mask


def mask_from_switches(op_type: str, attrs: object, switches: np.ndarray,
                       threshold: float | None = None, keep: float | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
    """The mask a gate node outputs: its stored threshold/keep ratio unless overridden for this call.
    out: float32 array of the switches' shape to write it into (returned), else a new array."""
    if op_type == "LKAMGate":
        t = attrs.threshold if threshold is None else threshold  # type: ignore[attr-defined]
        return lkam_mask(switches, t, attrs.mode, out)  # type: ignore[attr-defined]
    if op_type == "TopKGate":
        r = attrs.keep_ratio if keep is None else keep  # type: ignore[attr-defined]
        mask = topk_mask(switches, r, attrs.scaled)  # type: ignore[attr-defined]
        if out is None:
            return mask
        out[...] = mask
        return out
    raise ValueError(f"{op_type} is not a gate")


def active_channels(mask: np.ndarray) -> list[np.ndarray]:
    """mask: (N, K) -> per image the sorted int64 indices of channels with a non-zero mask value."""
    return [row.nonzero()[0].astype(np.int64, copy=False) for row in mask]

"""Small PNG drawings with Pillow only (no plotting library on boards): gate maps and curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from parsicore.errors import InputError


def _save(img: object, path: str | os.PathLike[str]) -> None:
    """Save atomically: a temp file beside the target, renamed over it once complete."""
    import tempfile
    from pathlib import Path

    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"{target}: directory {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG")  # type: ignore[attr-defined]
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gate_map(layers: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike[str], cell: int = 8) -> None:
    """One row per gated layer, one cell per kernel: green = on (computed), dark = off (skipped).

    layers: (layer name, bool array of kernels on) pairs, in execution order.
    """
    from PIL import Image, ImageDraw

    if not layers:
        raise InputError("this model has no gated layers, so there is no gate map to draw")
    label_w = 8 * max(len(name) for name, _ in layers) + 70
    width = label_w + cell * max(len(on) for _, on in layers) + 10
    height = (cell + 6) * len(layers) + 10
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for row, (name, on) in enumerate(layers):
        y = 5 + row * (cell + 6)
        draw.text((5, y - 2), f"{name} {int(on.sum())}/{on.size}", fill=(0, 0, 0))
        for k, flag in enumerate(on):
            x = label_w + k * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 1], fill=(40, 170, 60) if flag else (50, 50, 50))
    _save(img, path)


def curve(points: Sequence[tuple[float, float, str]], path: str | os.PathLike[str], title: str,
          xlabel: str = "fraction of MACs executed", ylabel: str = "accuracy") -> None:
    """Line plot of (x, y, annotation) points, e.g. accuracy against compute over thresholds."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 420, 60
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = 0.0, max(1.0, max(xs))
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.05, y1 + 0.05

    def px(x: float, y: float) -> tuple[float, float]:
        return (m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m))

    draw.line([px(x0, y0), px(x1, y0)], fill=(0, 0, 0))
    draw.line([px(x0, y0), px(x0, y1)], fill=(0, 0, 0))
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        draw.text((px(xv, y0)[0] - 10, h - m + 5), f"{xv:.1f}", fill=(0, 0, 0))
        yv = y0 + (y1 - y0) * i / 5
        draw.text((5, px(x0, yv)[1] - 5), f"{yv:.3f}", fill=(0, 0, 0))
    ordered = sorted(points)
    draw.line([px(x, y) for x, y, _ in ordered], fill=(30, 90, 200), width=2)
    for x, y, note in ordered:
        cx, cy = px(x, y)
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(200, 40, 40))
        draw.text((cx + 5, cy - 12), note, fill=(80, 80, 80))
    draw.text((m, 15), title, fill=(0, 0, 0))
    draw.text((w // 2 - 60, h - 25), xlabel, fill=(0, 0, 0))
    draw.text((5, 35), ylabel, fill=(0, 0, 0))
    _save(img, path)

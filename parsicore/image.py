"""Image file -> model input tensor, as the model's preprocessing metadata says.

Decoding is Pillow's, with a decompression-bomb guard (declared pixel count checked before any pixel is
decoded) and every decoder failure turned into one-line :class:`~parsicore.errors.ImageError`. Any mode
is accepted: L, LA, RGB, RGBA, P, CMYK, YCbCr, I, I;16, F, 1. Transparent pixels become black.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parsicore.errors import ImageError, ModelFormatError

#: Images declaring more pixels than this are refused before decoding (a 12-bit-per-side bomb is 16 M).
MAX_PIXELS = 64_000_000

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # Pillow's Resampling enum values


def check_preprocessing(pre: Any, source: str = "model") -> dict[str, Any]:
    """Validate a model's preprocessing metadata; ModelFormatError naming what is wrong."""
    if not isinstance(pre, Mapping):
        raise ModelFormatError(f"{source}: metadata has no 'preprocessing' object, so images cannot be prepared")
    try:
        h, w = (int(v) for v in pre["input_size"])
        colour = pre.get("colour", "RGB")
        resize = pre.get("resize", "stretch")
        interp = pre.get("interpolation", "bilinear")
        lo, hi = (float(v) for v in pre.get("value_range", (0.0, 1.0)))
        mean = [float(v) for v in pre.get("mean", [0.0])]
        std = [float(v) for v in pre.get("std", [1.0])]
        short = pre.get("resize_short")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{source}: malformed preprocessing metadata ({e})") from e
    channels = 1 if colour == "L" else 3
    problems = []
    if colour not in ("L", "RGB", "BGR"):
        problems.append(f"colour {colour!r}")
    if resize not in ("stretch", "short_side_crop"):
        problems.append(f"resize {resize!r}")
    if resize == "short_side_crop" and (not isinstance(short, int) or short < max(h, w)):
        problems.append(f"resize_short {short!r} (must be an integer >= the input size)")
    if interp not in _RESAMPLE:
        problems.append(f"interpolation {interp!r}")
    if len(mean) not in (1, channels) or len(std) not in (1, channels) or any(s == 0 for s in std):
        problems.append("mean/std (one value or one per channel, std non-zero)")
    if not (1 <= h <= 8192 and 1 <= w <= 8192):
        problems.append(f"input_size {h}x{w}")
    if problems:
        raise ModelFormatError(f"{source}: bad preprocessing metadata: {', '.join(problems)}")
    return {"size": (h, w), "colour": colour, "resize": resize, "short": short, "interp": interp,
            "range": (lo, hi), "mean": mean, "std": std, "channels": channels}


def _to_rgb_or_l(im: Any, colour: str) -> Any:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0) if im.mode != "F" else 1.0
        if im.mode == "I" and arr.max() <= 255:
            peak = 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    target = "L" if colour == "L" else "RGB"
    return im.convert(target) if im.mode != target else im


def _resize(im: Any, p: Mapping[str, Any]) -> Any:
    h, w = p["size"]
    resample = _RESAMPLE[p["interp"]]
    if p["resize"] == "stretch":
        return im.resize((w, h), resample=resample) if im.size != (w, h) else im
    short = p["short"]
    iw, ih = im.size
    scale = short / min(iw, ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    im = im.resize((nw, nh), resample=resample)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def load_image(path: str | os.PathLike[str], preprocessing: Mapping[str, Any]) -> np.ndarray:
    """Decode ``path`` and return float32 (1, C, H, W) prepared as ``preprocessing`` says (already checked)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{p}: {w}x{h} pixels is over the {MAX_PIXELS} limit (decompression bomb?)")
                im.load()
                im = _to_rgb_or_l(im, preprocessing["colour"])
                im = _resize(im, preprocessing)
                arr = np.asarray(im, dtype=np.float32)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p}: refused as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{p}: not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{p}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return prepare_array(arr, preprocessing)


def prepare_array(arr: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    """uint8-range pixels (H, W) or (H, W, 3) -> float32 (1, C, H, W) with value range and mean/std applied."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if p["colour"] == "BGR":
        arr = arr[:, :, ::-1]
    lo, hi = p["range"]
    x = arr.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
    mean = np.asarray(p["mean"], dtype=np.float32)
    std = np.asarray(p["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)

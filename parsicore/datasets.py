"""Labelled image sets for ``parsicore eval``: Fashion-MNIST/MNIST idx files, or class sub-folders.

idx files (optionally gzipped) are parsed with NumPy from their documented header: magic (0x0803 for
images, 0x0801 for labels), big-endian dimension sizes, then uint8 data. Nothing is unpickled.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parsicore.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
IDX_CANDIDATES = (
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (plain or .gz) -> uint8 array of its declared shape; InputError when malformed."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read idx file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise InputError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise InputError(f"{path}: idx declares {dims} ({count} bytes) but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


@dataclass(frozen=True)
class LabelledSet:
    """Either in-memory pixels (idx) or image paths, with integer labels."""

    labels: np.ndarray  # int64 (M,)
    pixels: np.ndarray | None = None  # uint8 (M, H, W)
    paths: tuple[Path, ...] = ()
    description: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def open_labelled_set(path: str | Path, class_names: Sequence[str]) -> LabelledSet:
    """Open DATA for eval: an idx directory (test split preferred), or a folder with one sub-folder per class."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: not a directory (expected Fashion-MNIST idx files or class sub-folders)")
    for images_stem, labels_stem in IDX_CANDIDATES:
        images, labels = _find(p, images_stem), _find(p, labels_stem)
        if images and labels:
            pixels, y = read_idx(images), read_idx(labels)
            if pixels.ndim != 3 or y.ndim != 1 or pixels.shape[0] != y.shape[0]:
                raise InputError(f"{p}: idx images {pixels.shape} and labels {y.shape} do not match")
            return LabelledSet(y.astype(np.int64), pixels=pixels, description=f"{images.name} ({len(y)} images)")
    folders = sorted(d for d in p.iterdir() if d.is_dir())
    if not folders:
        raise InputError(f"{p}: no idx files and no class sub-folders found")
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels_list = [], []
    for folder in folders:
        if folder.name not in index:
            raise InputError(f"{p}: sub-folder {folder.name!r} is not one of the model's labels")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels_list.append(index[folder.name])
    if not paths:
        raise InputError(f"{p}: class sub-folders hold no images")
    return LabelledSet(np.asarray(labels_list, dtype=np.int64), paths=tuple(paths),
                       description=f"{len(paths)} images in {len(folders)} class folders")


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))

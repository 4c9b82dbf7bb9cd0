"""Small models built with the builder, shared by the format, runtime, gate and CLI tests."""

from __future__ import annotations

import numpy as np

from parsicore.builder import ModelBuilder
from parsicore.format import ModelFile

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def _w(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = scale if scale is not None else 1.0 / np.sqrt(max(1, fan_in))
    return (rng.standard_normal(shape) * s).astype(np.float32)


def bn_weights(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.uniform(-0.2, 0.2, c),
            "mean": rng.uniform(-0.2, 0.2, c), "var": rng.uniform(0.5, 1.5, c)}


def small_cnn(seed: int = 0, channels: int = 1, size: int = 28, classes: int = 10) -> ModelBuilder:
    """conv-bn-relu, conv-relu-maxpool, depthwise conv, add, gap, flatten, gemm, softmax-free logits."""
    rng = np.random.default_rng(seed)
    b = ModelBuilder("small-cnn", description="test model", license="MIT", producer="tests/models.py")
    b.set_labels(FASHION_LABELS[:classes] if classes <= 10 else [f"class{i}" for i in range(classes)])
    b.set_preprocessing(input_size=(size, size), colour="L" if channels == 1 else "RGB", mean=[0.5], std=[0.5])
    b.add_input("image", (None, channels, size, size))
    b.add_node("Conv", ["image"], ["c1"], name="conv1", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, 8, channels, 3, 3), "bias": _w(rng, 8, scale=0.1)})
    b.add_node("BatchNorm", ["c1"], ["b1"], name="bn1", weights=bn_weights(rng, 8))
    b.add_node("Relu", ["b1"], ["r1"], name="relu1")
    b.add_node("Conv", ["r1"], ["c2"], name="conv2", attrs={"pads": (1, 1, 1, 1), "stride": (2, 2)},
               weights={"weight": _w(rng, 12, 8, 3, 3)})
    b.add_node("Clip", ["c2"], ["r2"], name="relu6", attrs={"lo": 0.0, "hi": 6.0})
    b.add_node("Conv", ["r2"], ["d3"], name="dw3", attrs={"pads": (1, 1, 1, 1), "groups": 12},
               weights={"weight": _w(rng, 12, 1, 3, 3), "bias": _w(rng, 12, scale=0.1)})
    b.add_node("Add", ["d3", "r2"], ["a3"], name="residual")
    b.add_node("MaxPool", ["a3"], ["p3"], name="pool3", attrs={"kernel": (2, 2), "stride": (2, 2)})
    b.add_node("GlobalAveragePool", ["p3"], ["g"], name="gap")
    b.add_node("Flatten", ["g"], ["f"], name="flatten")
    b.add_node("Gemm", ["f"], ["logits"], name="fc", weights={"weight": _w(rng, classes, 12),
                                                               "bias": _w(rng, classes, scale=0.1)})
    b.add_output("logits")
    return b


def gated_cnn(seed: int = 0, gate: str = "lkam", mode: str = "hard", offset: float = 0.0, channels: int = 3,
              size: int = 10, widths: tuple[int, int, int] = (6, 8, 10), two_banks: bool = True,
              gate_kernel: int = 1, scaled: bool = True, keep_ratio: float = 0.5,
              threshold: float = 0.5) -> ModelFile:
    """conv1 -> gate2 -> [conv2 -> BN -> relu -> mask2] -> maxpool -> gate3 -> [conv3 -> relu -> mask3] -> gap -> fc.

    ``offset`` is added to the gates' last bias: very negative switches most kernels off, very positive on.
    """
    rng = np.random.default_rng(seed)
    c1, c2, c3 = widths
    b = ModelBuilder("gated-cnn", license="MIT", producer="tests/models.py")
    b.set_labels([f"class{i}" for i in range(4)])
    b.set_preprocessing(input_size=(size, size), colour="RGB" if channels == 3 else "L")
    b.add_input("x", (None, channels, size, size))
    b.add_node("Conv", ["x"], ["c1"], name="conv1", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, c1, channels, 3, 3), "bias": _w(rng, c1, scale=0.1)})
    b.add_node("Relu", ["c1"], ["r1"], name="relu1")

    def add_gate(name: str, source: str, c_in: int, k: int) -> str:
        if gate == "lkam":
            hidden = max(2, c_in // 2)
            weights = {"w1": _w(rng, hidden if two_banks else k, c_in, gate_kernel, gate_kernel, scale=1.0),
                       "b1": _w(rng, hidden if two_banks else k, scale=0.5)}
            if two_banks:
                weights |= {"w2": _w(rng, k, hidden, 1, 1, scale=1.0), "b2": _w(rng, k, scale=0.5) + offset}
            else:
                weights["b1"] = weights["b1"] + offset
            b.add_node("LKAMGate", [source], [name], name=name, weights=weights,
                       attrs={"kernel_size": gate_kernel, "mode": mode, "threshold": threshold})
        else:
            b.add_node("TopKGate", [source], [name], name=name,
                       attrs={"keep_ratio": keep_ratio, "scaled": scaled},
                       weights={"weight": _w(rng, k, c_in, scale=1.0), "bias": _w(rng, k, scale=0.5) + offset})
        return name

    add_gate("gate2", "r1", c1, c2)
    b.add_node("Conv", ["r1"], ["c2"], name="conv2", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, c2, c1, 3, 3), "bias": _w(rng, c2, scale=0.1)})
    b.add_node("BatchNorm", ["c2"], ["b2"], name="bn2", weights=bn_weights(rng, c2))
    b.add_node("Relu", ["b2"], ["r2"], name="relu2")
    b.add_node("ChannelMask", ["r2", "gate2"], ["m2"], name="mask2")
    b.add_node("MaxPool", ["m2"], ["p2"], name="pool2", attrs={"kernel": (2, 2), "stride": (2, 2)})
    add_gate("gate3", "p2", c2, c3)
    b.add_node("Conv", ["p2"], ["c3"], name="conv3", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, c3, c2, 3, 3), "bias": _w(rng, c3, scale=0.1)})
    b.add_node("Relu", ["c3"], ["r3"], name="relu3")
    b.add_node("ChannelMask", ["r3", "gate3"], ["m3"], name="mask3")
    b.add_node("GlobalAveragePool", ["m3"], ["g"], name="gap")
    b.add_node("Flatten", ["g"], ["f"], name="flatten")
    b.add_node("Gemm", ["f"], ["logits"], name="fc", weights={"weight": _w(rng, 4, c3), "bias": _w(rng, 4, scale=0.1)})
    b.add_output("logits")
    return b.build()


def gated_inverted_residual(seed: int = 0, offset: float = 0.0, size: int = 8) -> ModelFile:
    """MobileNetV2-style gated chains, the channel-compact layouts' cases:
    stem -> gate_e -> [expand 1x1 -> relu6 -> mask_e] -> [dw 3x3 gated by gate_e -> relu6 -> mask_e'] -> project 1x1
    -> add(stem) -> gate_c -> [conv 3x3 -> relu -> mask_c] -> conv 3x3 -> gap -> fc.

    ``offset`` is added to the gates' last bias (very negative: most kernels off)."""
    rng = np.random.default_rng(seed)
    b = ModelBuilder("gated-inverted-residual", license="MIT", producer="tests/models.py")
    b.set_labels([f"class{i}" for i in range(3)])
    b.set_preprocessing(input_size=(size, size), colour="RGB")
    b.add_input("x", (None, 3, size, size))
    b.add_node("Conv", ["x"], ["s"], name="stem", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, 8, 3, 3, 3), "bias": _w(rng, 8, scale=0.1)})
    b.add_node("Relu", ["s"], ["sr"], name="stem_relu")

    def add_gate(name: str, source: str, c_in: int, k: int) -> None:
        b.add_node("LKAMGate", [source], [name], name=name,
                   weights={"w1": _w(rng, 4, c_in, 1, 1, scale=1.0), "b1": _w(rng, 4, scale=0.5),
                            "w2": _w(rng, k, 4, 1, 1, scale=1.0), "b2": _w(rng, k, scale=0.5) + offset},
                   attrs={"kernel_size": 1, "mode": "hard", "threshold": 0.5})

    add_gate("gate_e", "sr", 8, 24)
    b.add_node("Conv", ["sr"], ["e"], name="expand", weights={"weight": _w(rng, 24, 8, 1, 1)})
    b.add_node("BatchNorm", ["e"], ["eb"], name="expand_bn", weights=bn_weights(rng, 24))
    b.add_node("Clip", ["eb"], ["er"], name="expand_relu6", attrs={"lo": 0.0, "hi": 6.0})
    b.add_node("ChannelMask", ["er", "gate_e"], ["em"], name="expand_mask")
    b.add_node("Conv", ["em"], ["d"], name="dw", attrs={"pads": (1, 1, 1, 1), "groups": 24},
               weights={"weight": _w(rng, 24, 1, 3, 3), "bias": _w(rng, 24, scale=0.1)})
    b.add_node("Clip", ["d"], ["dr"], name="dw_relu6", attrs={"lo": 0.0, "hi": 6.0})
    b.add_node("ChannelMask", ["dr", "gate_e"], ["dm"], name="dw_mask")
    b.add_node("Conv", ["dm"], ["p"], name="project", weights={"weight": _w(rng, 8, 24, 1, 1),
                                                               "bias": _w(rng, 8, scale=0.1)})
    b.add_node("Add", ["p", "sr"], ["a"], name="residual")
    add_gate("gate_c", "a", 8, 12)
    b.add_node("Conv", ["a"], ["c"], name="conv", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, 12, 8, 3, 3), "bias": _w(rng, 12, scale=0.1)})
    b.add_node("Relu", ["c"], ["cr"], name="conv_relu")
    b.add_node("ChannelMask", ["cr", "gate_c"], ["cm"], name="conv_mask")
    b.add_node("Conv", ["cm"], ["c2"], name="conv2", attrs={"pads": (1, 1, 1, 1)},
               weights={"weight": _w(rng, 6, 12, 3, 3), "bias": _w(rng, 6, scale=0.1)})
    b.add_node("GlobalAveragePool", ["c2"], ["g"], name="gap")
    b.add_node("Flatten", ["g"], ["f"], name="flatten")
    b.add_node("Gemm", ["f"], ["logits"], name="fc", weights={"weight": _w(rng, 3, 6), "bias": _w(rng, 3, scale=0.1)})
    b.add_output("logits")
    return b.build()

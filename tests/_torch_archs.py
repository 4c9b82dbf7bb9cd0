"""Architectures for the exporter/importer tests, written here because torchvision is not available.

Import only after ``pytest.importorskip("torch")``. Every builder returns an eval-mode module with random
weights and random BatchNorm statistics (so BN is not the identity), seeded for reproducibility.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from parsicore.export.torch_modules import ChannelMask, LKAMGate, TopKGate, apply_mask


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: 7x7/2 stem, 3x3/2 max pool, 4 stages of 2 BasicBlocks, avgpool, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(ResNet18(), seed)


# ----------------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 layout (width 1.0): inverted residuals, ReLU6, depthwise 3x3 convs."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        feats: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                                nn.ReLU6(inplace=True))]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(MobileNetV2(), seed)


# ----------------------------------------------------------------------------------------------- VGG-style


class VGGSmall(nn.Module):
    """A VGG-style CNN for 32x32 RGB: conv-BN-ReLU pairs, max pools, a BN1d classifier head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                                      *block(64, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.BatchNorm1d(256),
                                        nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg_small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(VGGSmall(), seed)


# ----------------------------------------------------------------------------------------------- op zoo


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * s


class OpZoo(nn.Module):
    """Every other supported construct once: grouped/dilated/'same' convs, LeakyReLU, Hardswish, SiLU,
    Sigmoid, Tanh, clamp, AvgPool (ceil_mode, count_include_pad), F.pad, torch.cat, an SE block with a
    linear (view) variant, constant arithmetic, AdaptiveMaxPool2d, mean, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.LeakyReLU(0.1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4)
        self.same = nn.Conv2d(16, 8, 4, padding="same")
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.hs = nn.Hardswish()
        self.se = SqueezeExcite(24)
        self.pool = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.pool2 = nn.AvgPool2d(2, ceil_mode=True)
        self.pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.fc_se = nn.Linear(24, 24)
        self.head = nn.Linear(48, 10)
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 0.25
        x = self.act(self.bn(self.stem(x)))
        a = torch.sigmoid(self.grouped(x))
        b = torch.tanh(self.same(x))
        x = torch.cat([a, b], dim=1)
        x = self.se(self.hs(self.dw(x)))
        x = self.pool(x)
        x = F.pad(x, (1, 1, 0, 2), value=0.5)
        x = self.pool2(self.pad(x))
        w = torch.sigmoid(self.fc_se(x.mean(dim=(2, 3))))
        x = x * w.view(x.size(0), -1, 1, 1)
        x = torch.clamp(x, -1.0, 2.0) + 0.5
        g = F.adaptive_max_pool2d(x, 1).flatten(1)
        m = x.mean((2, 3))
        y = self.head(torch.cat([g, m], 1))
        return F.softmax(y * 3.0, dim=1)


def op_zoo(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(OpZoo(), seed)


# ----------------------------------------------------------------------------------------------- gated


class GatedNet(nn.Module):
    """Both gate kinds in both modes on a small CNN (input 3x32x32):

    conv1 (ungated) -> conv2 gated by an LKAMGate (hard, two banks) -> conv3 gated by an LKAMGate (scaled,
    one 3x3 bank, max pool) -> pool -> conv4 gated by a TopKGate (scaled, relu) -> conv5 gated by a
    TopKGate (hard, no activation: ties are impossible) -> mean -> fc.

    The mask is applied in the three ways the exporter recognises: ``apply_mask``, the ChannelMask module,
    and ``mask.unsqueeze(-1).unsqueeze(-1)``. Gate biases are set so that roughly half the kernels are off.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.gate2 = LKAMGate(16, 32, hidden=8, threshold=0.5, mode="hard", init_bias=0.0)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.gate3 = LKAMGate(32, 32, hidden=None, kernel_size=3, pool="max", threshold=0.6, mode="scaled",
                              init_bias=0.0)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.mask3 = ChannelMask()
        self.gate4 = TopKGate(32, 48, keep_ratio=0.5, scaled=True)
        self.conv4, self.bn4 = nn.Conv2d(32, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48)
        self.gate5 = TopKGate(48, 64, keep_ratio=0.3, scaled=False, activation="none", pool="max")
        self.conv5, self.bn5 = nn.Conv2d(48, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():  # saliencies well above zero so the scaled top-k keeps positive values
            self.gate4.fc.bias.add_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = apply_mask(F.relu(self.bn2(self.conv2(x))), self.gate2(x))
        x = self.mask3(F.relu(self.bn3(self.conv3(x))), self.gate3(x))
        x = F.max_pool2d(x, 2)
        m4 = self.gate4(x)
        x = F.relu(self.bn4(self.conv4(x))) * m4[:, :, None, None]
        m5 = self.gate5(x)
        x = F.relu(self.bn5(self.conv5(x))) * m5.unsqueeze(-1).unsqueeze(-1)
        return self.fc(x.mean(dim=(2, 3)))


def calibrate_lkam_gates(model: nn.Module, x: torch.Tensor) -> None:
    """Shift each LKAM gate's last bias so every channel's median switch over ``x`` sits at the threshold:
    about half the images run each kernel (random weights otherwise switch whole layers off)."""
    for gate in [m for m in model.modules() if isinstance(m, LKAMGate)]:
        seen: dict[str, torch.Tensor] = {}

        def grab(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor,
                 seen: dict[str, torch.Tensor] = seen) -> None:
            seen["x"] = inputs[0]

        hook = gate.register_forward_hook(grab)
        with torch.no_grad():
            model(x)
            hook.remove()
            s = gate.switches(seen["x"]).clamp(1e-6, 1 - 1e-6)
            last = gate.bank2 if gate.bank2 is not None else gate.bank1
            # Adding d to the last bank's bias adds d to its globally pooled output (avg and max alike).
            last.bias += torch.logit(torch.tensor(gate.threshold)) - torch.logit(s).median(dim=0).values


def gated_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomise_bn(GatedNet(), seed)
    calibrate_lkam_gates(model, torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1)))
    return model


ARCHITECTURES = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "vgg_small": vgg_small,
    "op_zoo": op_zoo,
    "gated": gated_net,
}

"""Architecture of the default gated Fashion-MNIST model (PyTorch).

The network is a plain VGG-style stack described by a layer string such as
``"32,64,P,128,128,P,256"``: integers are 3x3 conv layers (conv -> BN -> ReLU,
stride 1, padding 1), ``P`` is a 2x2 max pool.  After the last conv comes a
global average pool and a linear classifier.  Every conv except the first one
is gated by an :class:`~parsicore.export.torch_modules.LKAMGate` that reads the
feature map entering that conv (the previous layer's ReLU output, or the
pooled map when a pool sits in between) and switches the conv's output
channels; the mask multiplies the output after conv -> BN -> ReLU.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parsicore.export.torch_modules import LKAMGate, apply_mask

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MEAN = 0.2860
STD = 0.3530


@dataclass
class ArchConfig:
    """Hyper-parameters of the architecture (stored as JSON in the .npz)."""

    layers: str = "32,P,64,64,P,128,128"
    gated: bool = True
    gate_hidden: int = 16
    gate_kernel: int = 1
    gate_activation: str = "relu"
    gate_pool: str = "avg"
    threshold: float = 0.5
    mode: str = "hard"
    gate_bias: float = 2.0
    num_classes: int = 10
    in_channels: int = 1
    input_hw: tuple[int, int] = field(default=(28, 28))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_hw"] = list(self.input_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ArchConfig:
        d = dict(d)
        d["input_hw"] = tuple(d.get("input_hw", (28, 28)))
        return cls(**d)


def parse_layers(spec: str) -> list[int | str]:
    """Parse ``"32,64,P,128"`` into ``[32, 64, 'P', 128]``."""
    out: list[int | str] = []
    for tok in spec.split(","):
        tok = tok.strip()
        out.append("P" if tok.upper() == "P" else int(tok))
    return out


class GatedNet(nn.Module):
    """VGG-style CNN with LKAM gates on every conv but the first."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.plan = parse_layers(cfg.layers)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.gates = nn.ModuleList()  # gates[i] is None-equivalent (Identity) for ungated
        self.pool_after: list[bool] = []
        c = cfg.in_channels
        first = True
        for i, item in enumerate(self.plan):
            if item == "P":
                continue
            k = int(item)
            self.convs.append(nn.Conv2d(c, k, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(k))
            if cfg.gated and not first:
                self.gates.append(
                    LKAMGate(
                        c,
                        k,
                        hidden=cfg.gate_hidden,
                        kernel_size=cfg.gate_kernel,
                        activation=cfg.gate_activation,
                        pool=cfg.gate_pool,
                        threshold=cfg.threshold,
                        mode=cfg.mode,
                        init_bias=cfg.gate_bias,
                    )
                )
            else:
                self.gates.append(nn.Identity())
            nxt = self.plan[i + 1] if i + 1 < len(self.plan) else None
            self.pool_after.append(nxt == "P")
            c = k
            first = False
        self.fc = nn.Linear(c, cfg.num_classes)

    def gate_modules(self) -> list[LKAMGate]:
        return [g for g in self.gates if isinstance(g, LKAMGate)]

    def set_threshold(self, threshold: float) -> None:
        for g in self.gate_modules():
            g.threshold = float(threshold)

    def forward(self, x: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        """Logits.  If ``stats`` is a dict, per-sample MAC counts are added to it
        (keys ``conv``, ``gate``, ``dense``; tensors of shape (N,))."""
        n = x.shape[0]
        active_in = torch.full((n,), float(x.shape[1]), device=x.device)
        for conv, bn, gate, pool in zip(self.convs, self.bns, self.gates, self.pool_after):
            mask = None
            if isinstance(gate, LKAMGate):
                mask = gate(x)
                if stats is not None:
                    h, w = x.shape[2:]
                    stats["gate"] = stats.get("gate", 0) + gate.bank_macs(h, w)
            y = F.relu(bn(conv(x)))
            if stats is not None:
                ho, wo = y.shape[2:]
                kk = conv.kernel_size[0] * conv.kernel_size[1] * ho * wo
                out_active = (
                    (mask > 0).sum(1).to(torch.float32)
                    if mask is not None
                    else torch.full((n,), float(conv.out_channels))
                )
                stats["conv"] = stats.get("conv", 0) + active_in * out_active * kk
                stats["dense"] = stats.get("dense", 0) + conv.in_channels * conv.out_channels * kk
                active_in = out_active
            if mask is not None:
                y = apply_mask(y, mask)
            if pool:
                y = F.max_pool2d(y, 2, 2)
            x = y
        x = x.mean(dim=(2, 3))
        return self.fc(x)

    def switch_penalty(self) -> torch.Tensor:
        """Mean over gates of the mean soft switch value of the last forward."""
        gs = self.gate_modules()
        if not gs:
            return torch.zeros(())
        return torch.stack([g.last_switches.mean() for g in gs]).mean()


def state_to_arrays(model: GatedNet) -> dict[str, object]:
    """Float32 numpy arrays of the model's state (parameters + BN buffers)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_arrays(model: GatedNet, arrays: dict) -> None:
    """Load arrays produced by :func:`state_to_arrays` into ``model``."""
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            new[k] = v
        else:
            new[k] = torch.as_tensor(arrays[k]).to(v.dtype)
    model.load_state_dict(new)

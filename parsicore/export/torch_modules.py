"""PyTorch gate modules matching parsicore's gate semantics.

This module imports torch and is only used for training and export; the
engine core never imports it.

Semantics (must match the engine exactly):

* :class:`LKAMGate` reads the feature map ``X`` (N, C, H, W) and produces one
  switch per output channel of the *target* conv layer::

      s = sigmoid(globalpool(bank2(act(bank1(X)))))       # (N, K)

  In eval mode the mask is ``1.0`` (``mode='hard'``) or ``s`` (``mode='scaled'``)
  where ``s > threshold`` and ``0`` elsewhere.  In training mode the forward
  pass uses the hard 0/1 switch with a straight-through gradient
  (``m = hard + s - s.detach()``, or ``m = hard * s`` for scaled mode).
* :class:`TopKGate` (FBS-style) keeps the ``ceil(keep_ratio * K)`` most salient
  kernels per sample.
* The mask multiplies the target layer's output after conv -> BN -> ReLU
  (see :class:`ChannelMask`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ChannelMask", "LKAMGate", "TopKGate", "apply_mask"]


def _global_pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "max":
        return x.amax(dim=(2, 3))
    raise ValueError(f"unknown pool {pool!r}")


class LKAMGate(nn.Module):
    """Learned kernel activation module (arXiv 1701.05221) with plain attributes.

    Attributes read by the exporter: ``threshold``, ``mode`` ('hard'|'scaled'),
    ``pool`` ('avg'|'max'), ``activation`` ('relu'|'none'), ``kernel_size``,
    submodules ``bank1`` (nn.Conv2d) and optional ``bank2`` (1x1 nn.Conv2d).
    """

    def __init__(
        self,
        in_channels: int,
        out_kernels: int,
        hidden: int | None = 16,
        kernel_size: int = 1,
        activation: str = "relu",
        pool: str = "avg",
        threshold: float = 0.5,
        mode: str = "hard",
        init_bias: float = 3.0,
    ) -> None:
        super().__init__()
        if mode not in ("hard", "scaled"):
            raise ValueError(f"mode must be 'hard' or 'scaled', got {mode!r}")
        if activation not in ("relu", "none"):
            raise ValueError(f"activation must be 'relu' or 'none', got {activation!r}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.threshold = float(threshold)
        self.mode = mode
        self.pool = pool
        self.activation = activation
        self.kernel_size = int(kernel_size)
        self.in_channels = int(in_channels)
        self.out_kernels = int(out_kernels)
        pad = self.kernel_size // 2
        if hidden:
            self.bank1 = nn.Conv2d(in_channels, hidden, self.kernel_size, padding=pad, bias=True)
            self.bank2: nn.Conv2d | None = nn.Conv2d(hidden, out_kernels, 1, bias=True)
            last = self.bank2
        else:
            self.bank1 = nn.Conv2d(in_channels, out_kernels, self.kernel_size, padding=pad, bias=True)
            self.bank2 = None
            last = self.bank1
        # start with every kernel switched on
        nn.init.constant_(last.bias, init_bias)
        self.last_switches: torch.Tensor | None = None

    def switches(self, x: torch.Tensor) -> torch.Tensor:
        """Soft switches ``s`` of shape (N, K).

        ``activation`` sits between the two banks; a single-bank gate has none.
        """
        h = self.bank1(x)
        if self.bank2 is not None:
            if self.activation == "relu":
                h = F.relu(h)
            h = self.bank2(h)
        return torch.sigmoid(_global_pool(h, self.pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.switches(x)
        self.last_switches = s
        on = (s > self.threshold).to(s.dtype)
        if self.training:
            if self.mode == "hard":
                return on + s - s.detach()
            return on * s
        return on if self.mode == "hard" else on * s

    def bank_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of the gate banks on a (C, H, W) input."""
        k = self.kernel_size
        b1 = self.bank1
        macs = b1.in_channels * b1.out_channels * k * k * height * width
        if self.bank2 is not None:
            macs += self.bank2.in_channels * self.bank2.out_channels * height * width
        return macs

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, mode={self.mode!r}, pool={self.pool!r}, "
            f"activation={self.activation!r}, kernel_size={self.kernel_size}"
        )


class TopKGate(nn.Module):
    """FBS-style gate: global pool -> linear (K x C) + bias -> optional relu -> top-k.

    Plain attributes: ``keep_ratio``, ``scaled``, ``activation`` ('relu'|'none'),
    ``pool`` ('avg'|'max'); submodule ``fc`` (nn.Linear, weight (K, C)).
    """

    def __init__(
        self,
        in_channels: int,
        out_kernels: int,
        keep_ratio: float = 0.5,
        scaled: bool = True,
        activation: str = "relu",
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError("keep_ratio must be in (0, 1]")
        self.keep_ratio = float(keep_ratio)
        self.scaled = bool(scaled)
        self.activation = activation
        self.pool = pool
        self.fc = nn.Linear(in_channels, out_kernels, bias=True)
        self.last_saliency: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return max(1, math.ceil(self.keep_ratio * self.fc.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sal = self.fc(_global_pool(x, self.pool))
        if self.activation == "relu":
            sal = F.relu(sal)
        self.last_saliency = sal
        # stable sort by decreasing saliency: ties go to the lower channel index (as the engine)
        if torch.onnx.is_in_onnx_export():
            # torch.onnx cannot export a stable sort; ONNX TopK also breaks ties by the lower index
            idx = sal.topk(self.k, dim=1).indices
        else:
            idx = torch.sort(sal, dim=1, descending=True, stable=True).indices[:, : self.k]
        keep = torch.zeros_like(sal).scatter_(1, idx, 1.0)
        return keep * sal if self.scaled else keep


def apply_mask(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``y * mask[:, :, None, None]`` (mask applied after conv -> BN -> ReLU)."""
    return y * mask[:, :, None, None]


class ChannelMask(nn.Module):
    """Module form of :func:`apply_mask`."""

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return apply_mask(y, mask)

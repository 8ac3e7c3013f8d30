"""The contract every model keeps: it takes images in [0, 1] and returns logits. Normalisation is the model's first
layer, so PGD and AutoAttack work in pixel space and the eps-ball means what it says.

A model file holds its network and a ModelSpec: how to build it, its own settings (models.<name> in params.yaml),
which image shapes it fits, and its name as papers and RobustBench write it.
Adding a model = one new file here + one line in MODELS (models/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..schema import Check


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """[0, 1] images -> logits."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.channels_last = False

    def use_channels_last(self, on: bool = True) -> "Classifier":
        """Weights and activations in NHWC; inputs in any layout are converted on entry (AutoAttack passes NCHW)."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def forward(self, x):
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # (in_channels, num_classes, **params) -> nn.Module
    params: dict[str, Check] = field(default_factory=dict)  # config checks for the model's own settings
    fits: Callable[[tuple], bool] = lambda shape: True  # (C, H, W) -> whether the network takes such images
    fits_doc: str = ""
    paper_name: Callable[[dict], str] | None = None  # settings -> e.g. "WideResNet-34-10"
    # CPU threads a job of this model uses best (Snakemake's `threads:` for CPU jobs, up to the cores given). A small
    # network keeps two threads of one process only partly busy: two one-thread jobs side by side get more done.
    cpu_threads: int = 8

    def architecture(self, params: dict[str, Any]) -> str:
        return self.paper_name(params) if self.paper_name else self.name

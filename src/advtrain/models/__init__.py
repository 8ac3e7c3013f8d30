"""Models by name. Every model takes images in [0, 1]: normalisation is the model's first layer, so PGD and
AutoAttack work in pixel space and the eps-ball means what it says."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .preact_resnet import PreActResNet18
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet


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
    build: Callable[..., nn.Module]  # (in_channels, num_classes, **params) -> nn.Module
    params: dict[str, Any] = field(default_factory=dict)  # config checks for the model's own settings
    fits: Callable[[tuple], bool] = lambda shape: True
    fits_doc: str = ""


def _registry() -> dict[str, ModelSpec]:
    from ..config import _fail, choice, integer, number

    def wrn_depth(v, key):
        if integer(10)(v, key) and (v - 4) % 6:
            _fail(key, "6n+4 (e.g. 16, 28, 34)", v)
        return v

    return {
        "small_cnn": ModelSpec(
            lambda c, k, width=16, hidden=128, kernel=3: SmallCNN(c, k, width, hidden, kernel),
            {"width": integer(1), "hidden": integer(1), "kernel": choice(3, 5)},
            fits=lambda s: s[1:] == (28, 28), fits_doc="it is built for 28x28 inputs",
        ),
        "preact_resnet18": ModelSpec(
            lambda c, k: PreActResNet18(c, k),
            fits=lambda s: min(s[1:]) >= 16, fits_doc="it needs images of at least 16x16",
        ),
        "wide_resnet": ModelSpec(
            lambda c, k, depth=34, width=10, dropout=0.0: WideResNet(depth, width, c, k, dropout),
            {"depth": wrn_depth, "width": integer(1), "dropout": number(0, 1, hi_open=True)},
            fits=lambda s: min(s[1:]) >= 16, fits_doc="it needs images of at least 16x16",
        ),
    }


MODELS: dict[str, ModelSpec] = _registry()


def architecture_name(name: str, params: dict) -> str:
    """The architecture as papers and RobustBench spell it."""
    if name == "wide_resnet":
        return f"WideResNet-{params.get('depth', 34)}-{params.get('width', 10)}"
    return {"preact_resnet18": "PreActResNet-18", "small_cnn": "SmallCNN"}.get(name, name)


def build_model(name: str, shape: tuple, num_classes: int, mean, std, **params) -> Classifier:
    return Classifier(MODELS[name].build(shape[0], num_classes, **params), mean, std)


def model_for(cfg) -> Classifier:
    """A fresh model of a run's configured architecture, for its dataset."""
    info = cfg.info
    return build_model(cfg.model, info["shape"], info["classes"], info["mean"], info["std"], **cfg.model_kwargs)

"""Models by name (see base.py for the contract)."""
from __future__ import annotations

from ..lazy import nn
from . import preact_resnet, resnet50, small_cnn, wide_resnet
from .base import ModelSpec, classifier

MODELS: dict[str, ModelSpec] = {s.name: s for s in (small_cnn.SPEC, preact_resnet.SPEC, wide_resnet.SPEC,
                                                              resnet50.SPEC)}


def build_model(name: str, shape: tuple, num_classes: int, mean, std, **params) -> nn.Module:
    """A Classifier (base.py) of the architecture `name`."""
    return classifier(MODELS[name].build(shape[0], num_classes, **params), mean, std)


def model_for(cfg) -> nn.Module:
    """A fresh model (a Classifier) of a run's configured architecture, for its dataset."""
    info = cfg.info
    return build_model(cfg.model, info["shape"], info["classes"], info["mean"], info["std"], **cfg.model_kwargs)


__all__ = ["MODELS", "ModelSpec", "build_model", "classifier", "model_for"]

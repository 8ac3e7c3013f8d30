"""The contract between the trainer and a training method.

The trainer owns the loop (data, learning-rate schedule, precision, checkpoints, metrics); a method owns one
minibatch's work: it crafts its inputs (using the trainer's `attack_mode()` and `autocast`), then calls
`trainer.update(inputs, loss_fn)` once per optimizer step and `trainer.record(...)` for the epoch's accuracies.
Adding a method = one new file here + one line in METHODS (methods/__init__.py).
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..attacks import ball
from ..lazy import torch


class Method:
    name: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {}  # setting -> config check (see config.py); validated on load
    defaults: ClassVar[dict[str, Any]] = {}

    holdout: int = 0  # training images the trainer keeps aside for this method's end-of-epoch check (held_out)
    held_out_key: ClassVar[str] = ""  # the setting that says how many, for messages
    # A method that learns from a teacher trained on clean data: the `pretrain` stage trains that teacher first
    # (teacher_recipe says how), and the trainer hands it over (attach_teacher).
    needs_teacher: ClassVar[bool] = False
    threat_models: ClassVar[tuple[str, ...]] = ("Linf",)  # the balls this method has a form for
    selection_metric: ClassVar[str] = "val_pgd_acc"  # what `training.select: best` maximises over the epochs

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.p = cfg.method_params
        self.eps = cfg.eps
        self.alpha = self.p.get("alpha") or cfg.alpha
        self.holdout = self.held_out(self.p)
        self.ball = ball(cfg.threat_model, cfg.eps)

    @classmethod
    def held_out(cls, params: dict) -> int:
        """How many training images this method keeps out of training for its own check, from its settings."""
        return params[cls.held_out_key] if cls.held_out_key else 0

    @classmethod
    def teacher_recipe(cls, params: dict) -> dict:
        """How this method's teacher is pretrained, from the method's settings: {"model": an architecture name, or
        None for the dataset's; "epochs": clean-training epochs; "holdout": training images kept out of it}."""
        raise NotImplementedError(f"{cls.name} has no teacher")

    def attach_teacher(self, trainer, teacher: torch.nn.Module) -> None:
        raise NotImplementedError(f"{self.name} has no teacher")

    def setup(self, trainer) -> None:
        """Called once the trainer has its model and data (subclasses call super().setup(trainer) first)."""
        self.device = trainer.device
        self.world = trainer.world  # under torchrun: a per-example state or an epoch's count spans the ranks

    def data_passes(self, epochs: int) -> int:
        """How many passes over the data `training.epochs` means for this method (FREE-m: epochs / m)."""
        return epochs

    def begin_epoch(self) -> None:
        """Called before each epoch (e.g. to zero the method's own accumulators)."""

    def step(self, trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def attack_steps(self) -> int:
        """The attack iterations (or replays) per minibatch now in use, logged each epoch."""
        return 0

    def end_epoch(self, trainer, epoch: int, metrics: dict) -> dict:
        """Called after each epoch with its metrics (grad_l1 among them); returns extra metrics to log."""
        return {}

    def epoch_sums(self) -> dict:
        """The method's own accumulators of the epoch in progress, each a sum over minibatches (a number or a
        tensor), for a checkpoint written inside an epoch (preemption.py)."""
        return {}

    def load_epoch_sums(self, sums: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

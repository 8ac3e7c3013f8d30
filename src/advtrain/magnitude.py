"""The gradient-magnitude rule "M+" of DEAT (Wang et al. 2021), one reusable controller for any iterative method.

It turns each epoch's gradient magnitude G_e (the sum over the epoch's minibatches of ||grad_x L||_1, which the
trainer measures at the training pass) into the iteration/replay count of the next epoch:

  epoch 0 trains with `start`, epoch 1 with `start + 1`;
  after epoch 1:        threshold = gamma * G_1;
  after each epoch e>1: if G_e > threshold and count < maximum: count += 1 and threshold = gamma * G_e
                        (the threshold only moves when the count grows).

DEAT uses start = 1 (replays), M+PGD start = 0 (plain training first), M+TRADES start = 0.
Its state (count, threshold) is saved in the training checkpoint, so a resumed run continues the same schedule.
A fixed schedule (DEAT-d: count = start + floor(epoch / d), capped) is available as `every=d`."""
from __future__ import annotations


class MagnitudeRule:
    def __init__(self, gamma: float, maximum: int, start: int = 1, every: int | None = None):
        if gamma <= 0 or maximum < start:
            raise ValueError(f"MagnitudeRule needs gamma > 0 and maximum >= start (got {gamma}, {maximum}, {start})")
        self.gamma, self.maximum, self.start, self.every = gamma, maximum, start, every
        self.count = start
        self.threshold: float | None = None

    def update(self, epoch: int, magnitude: float) -> int:
        """Record the magnitude measured in `epoch` (0-based); return the count for epoch + 1."""
        if self.every:  # DEAT-d: a fixed staircase, the magnitude is only logged
            self.count = min(self.maximum, self.start + (epoch + 1) // self.every)
        elif epoch == 0:
            self.count = min(self.maximum, self.start + 1)
        elif epoch == 1 or self.threshold is None:
            self.threshold = self.gamma * magnitude
        elif magnitude > self.threshold and self.count < self.maximum:
            self.count += 1
            self.threshold = self.gamma * magnitude
        return self.count

    def state_dict(self) -> dict:
        return {"count": self.count, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.threshold = state["count"], state["threshold"]


class MagnitudeDriven:
    """Mixin for a method whose iteration/replay count is a MagnitudeRule's (DEAT, M+PGD, M+TRADES): the count in
    use, its update after each epoch, and its state in the checkpoint. Put it before the method's base class."""

    rule: MagnitudeRule

    def make_rule(self, maximum_key: str, start: int, every: int | None = None) -> None:
        self.rule = MagnitudeRule(self.p["gamma"], self.p[maximum_key], start=start, every=every)

    def attack_steps(self) -> int:
        return self.rule.count

    def end_epoch(self, trainer, epoch: int, metrics: dict) -> dict:
        return {"next_steps": self.rule.update(epoch, metrics["grad_l1"])}

    def state_dict(self) -> dict:
        return {"rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])

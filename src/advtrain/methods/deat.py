"""DEAT, dynamic efficient adversarial training (Wang et al. 2021): FREE-style replays from a FRESH random start per
minibatch, with a replay count r that grows during training under the gradient-magnitude rule (magnitude.py).

Per minibatch: delta ~ U(-eps, eps), box; r times: forward on x + delta, backward, optimizer step,
delta <- box/project(delta + alpha_r * sign(grad)), alpha_r = max(eps / r, alpha). The epoch's magnitude is taken
from the LAST replay of each minibatch. `schedule: fixed` gives DEAT-d: r = 1 + floor(epoch / every)."""

from ..attacks import project_box, uniform_start
from ..lazy import F
from ..schema import choice, integer, number, optional
from ..magnitude import MagnitudeDriven
from .base import Method


class DEAT(MagnitudeDriven, Method):
    name = "deat"
    params = {"gamma": number(0, lo_open=True), "r_max": integer(1), "alpha": optional(number(0, 1, lo_open=True)),
              "schedule": choice("magnitude", "fixed"), "every": integer(1)}
    defaults = {"gamma": 1.01, "r_max": 8, "alpha": None, "schedule": "magnitude", "every": 3}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.make_rule("r_max", start=1, every=self.p["every"] if self.p["schedule"] == "fixed" else None)

    def step_size(self) -> float:
        return max(self.eps / self.rule.count, self.alpha)

    def step(self, trainer, x, y):
        r, a = self.rule.count, self.step_size()
        x_adv = uniform_start(x, self.eps, trainer.noise(x))  # a fresh start for every minibatch (FREE keeps one)
        for i in range(r):
            logits, loss = trainer.update(x_adv, lambda logits: F.cross_entropy(logits, y), within_batch=(i + 1) / r,
                                          measure=i == r - 1)
            if i < r - 1:
                x_adv = project_box(x_adv + a * trainer.input_grad.sign(), x, self.eps)
        trainer.record(loss, adv=(logits, y))

    def end_epoch(self, trainer, epoch, metrics):
        out = super().end_epoch(trainer, epoch, metrics)
        return {**out, "next_step_size": self.step_size()}

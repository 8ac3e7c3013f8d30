"""PGD adversarial training (Madry et al. 2018), with the clean/adversarial `fraction` option of seed 003.

The first (1 - f)·B examples of a batch stay clean, the rest are attacked with K-step PGD (model in eval mode by
default); clean and adversarial examples go through ONE forward pass, loss = (1 - f)·CE_clean + f·CE_adv.
f = 1 is Madry's recipe, f = 0.5 the 50/50 variant."""

from ..attacks import pgd
from ..lazy import F, torch
from ..schema import choice, integer, number, optional
from .base import Method


class PGD(Method):
    name = "pgd"
    threat_models = ("Linf", "L2")
    params = {"steps": integer(0), "fraction": number(0, 1), "alpha": optional(number(0, 1, lo_open=True)),
              "attack_mode": choice("eval", "train")}
    defaults = {"steps": 10, "fraction": 1.0, "alpha": None, "attack_mode": "eval"}

    def attack_steps(self) -> int:
        return self.p["steps"]

    def step_size(self) -> float:
        return self.alpha

    def step(self, trainer, x, y):
        f, steps = self.p["fraction"], self.attack_steps()
        n_clean = len(x) - round(f * len(x))
        x_adv, y_adv = x[n_clean:], y[n_clean:]
        if steps and len(x_adv):
            with trainer.attack_mode(self.p["attack_mode"]):
                x_adv = pgd(trainer.model, x_adv, y_adv, self.eps, self.step_size(), steps, autocast=trainer.autocast,
                            norm=self.ball.norm, noise=trainer.noise(x_adv))
            trainer.count_passes(steps, len(x_adv))

        f = (len(x) - n_clean) / len(x)  # the share really attacked (a last, odd-sized batch rounds)

        def loss_fn(logits):
            parts = []
            if n_clean:
                parts.append((1 - f) * F.cross_entropy(logits[:n_clean], y[:n_clean]))
            if n_clean < len(x):
                parts.append(f * F.cross_entropy(logits[n_clean:], y_adv))
            return sum(parts)

        # the gradient magnitude is the attacked part's (what the magnitude rule of M+PGD watches)
        logits, loss = trainer.update(torch.cat([x[:n_clean], x_adv]), loss_fn, measure=slice(n_clean, None))
        trainer.record(loss, clean=(logits[:n_clean], y[:n_clean]), adv=(logits[n_clean:], y_adv))

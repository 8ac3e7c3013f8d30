"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)).

Inner maximisation with the model in eval mode: x_adv = x + 0.001 * N(0, 1), then K steps of alpha * sign(grad) on
KL(f(x) || f(x_adv)), box/project each step. Outer, in train mode: two forwards, on x then on x_adv, as the reference
(batch norm normalises each on its own); the gradient magnitude is taken on x_adv."""
from __future__ import annotations

from ..lazy import F, torch
from ..schema import integer, number, optional
from .base import Method


def kl(logits_adv: torch.Tensor, probs_clean: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits_adv, dim=1), probs_clean, reduction=reduction)


def trades_attack(trainer, x, threat, alpha, steps):
    model = trainer.model
    with trainer.attack_mode("eval"):
        with torch.no_grad(), trainer.autocast():
            p_clean = F.softmax(model(x).float(), dim=1)
        x_adv = threat.project(x + 0.001 * trainer.normal_noise(x), x)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with trainer.autocast():
                logits = model(x_adv)
            grad, = torch.autograd.grad(kl(logits.float(), p_clean, "sum"), x_adv)
            x_adv = threat.project(threat.ascend(x_adv.detach(), grad, alpha), x)
    trainer.count_passes(steps, len(x))
    return x_adv.detach()


class TRADES(Method):
    name = "trades"
    threat_models = ("Linf", "L2")
    params = {"beta": number(0), "steps": integer(0), "alpha": optional(number(0, 1, lo_open=True))}
    defaults = {"beta": 6.0, "steps": 10, "alpha": None}

    def attack_steps(self) -> int:
        return self.p["steps"]

    def step_size(self) -> float:
        return self.alpha

    def step(self, trainer, x, y):
        x_adv = trades_attack(trainer, x, self.ball, self.step_size(), self.attack_steps())
        beta = self.p["beta"]
        with trainer.autocast():
            clean = trainer.model(x).float()  # train mode; its backward happens with update's
        trainer.count_passes(1, len(x))

        def loss_fn(adv):
            return F.cross_entropy(clean, y) + beta * kl(adv, F.softmax(clean, dim=1))

        adv, loss = trainer.update(x_adv, loss_fn)
        trainer.record(loss, clean=(clean, y), adv=(adv, y), n=len(x))  # n examples, seen clean and attacked

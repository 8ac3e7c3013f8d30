"""FGSM with a random start, "fast is better than free" (Wong, Rice & Kolter 2020): the speed anchor.

delta ~ U(-eps, eps), box; one step delta <- project(delta + step * eps * sign(grad)), box; train on x + delta.
The reference crafts in train mode (`attack_mode: train`).

Catastrophic overfitting (robust accuracy collapsing within an epoch) is watched for: after every epoch, PGD on
`check_points` held-out training images; if its accuracy falls more than `drop` below the best so far, then per
`on_overfit`: `stop` (roll back to the best epoch's weights and end training), `rollback` (roll back and go on),
or `off` (only report it). Every event is logged and recorded in the metrics (`overfit`, `holdout_pgd_acc`)."""

from ..attacks import pgd, worst_case
from ..lazy import F, torch
from ..schema import choice, integer, number
from .base import Method


class FGSM(Method):
    name = "fgsm"
    held_out_key = "check_points"
    params = {"step": number(0, lo_open=True), "attack_mode": choice("eval", "train"), "check_points": integer(0),
              "check_steps": integer(1), "drop": number(0, 1, lo_open=True), "on_overfit": choice("stop", "rollback", "off")}
    defaults = {"step": 1.25, "attack_mode": "train", "check_points": 512, "check_steps": 10, "drop": 0.2,
                "on_overfit": "stop"}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.best_acc, self.best_epoch, self.best = None, 0, None
        self.events = 0

    def attack_steps(self) -> int:
        return 1

    def step(self, trainer, x, y):
        with trainer.attack_mode(self.p["attack_mode"]):
            x_adv = pgd(trainer.model, x, y, self.eps, self.p["step"] * self.eps, steps=1, autocast=trainer.autocast,
                        noise=trainer.noise(x))
        trainer.count_passes(1, len(x))
        logits, loss = trainer.update(x_adv, lambda logits: F.cross_entropy(logits, y))
        trainer.record(loss, adv=(logits, y))

    def holdout_accuracy(self, trainer) -> float:
        """PGD accuracy on the held-out images, averaged over the ranks under torchrun: their BatchNorm statistics
        differ (each normalises its own shard), and the guard's decision must be the same on every rank."""
        x, y = trainer.holdout
        robust, _ = worst_case(trainer.model, x, y, self.eps, self.eps / 4, self.p["check_steps"],
                               autocast=trainer.autocast, adversarial=False)
        trainer.model.train()
        correct = trainer.world.sum(robust.sum().to(torch.float64))
        return correct.item() / (len(y) * trainer.world.size)

    def end_epoch(self, trainer, epoch, metrics):
        if not self.p["check_points"]:
            return {}
        acc = self.holdout_accuracy(trainer)
        out = {"holdout_pgd_acc": acc, "overfit": 0}
        if self.best_acc is None or acc >= self.best_acc:
            self.best_acc, self.best_epoch, self.best = acc, epoch + 1, trainer.snapshot()
        elif acc < self.best_acc - self.p["drop"]:
            self.events += 1
            out["overfit"] = 1
            what = (f"catastrophic overfitting in epoch {epoch + 1}: PGD-{self.p['check_steps']} accuracy on "
                    f"{len(trainer.holdout[1])} held-out images fell from {100 * self.best_acc:.1f}% (epoch "
                    f"{self.best_epoch}) to {100 * acc:.1f}%")
            action = self.p["on_overfit"]
            if action != "off":
                trainer.restore(self.best)
            if action == "stop":
                trainer.request_stop(f"{what}; weights rolled back to epoch {self.best_epoch}")
            else:
                trainer.log(f"[{trainer.cfg.name}] warning: {what}"
                            + (f"; rolled back to epoch {self.best_epoch}, training goes on" if action == "rollback" else ""))
        return out

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "best": self.best, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.best_epoch, self.best, self.events = (state["best_acc"], state["best_epoch"], state["best"],
                                                                   state["events"])

"""FREE-m adversarial training (Shafahi et al., NeurIPS 2019): "adversarial training for free".

One perturbation `delta`, zero-initialised ONCE and carried across minibatches and epochs. Each minibatch is
replayed m times; each replay is ONE forward on box(x + delta) and ONE backward that yields both the weight gradient
(-> optimizer step) and the input gradient (-> delta <- project(delta + eps * sign(grad))). To keep the work of
natural training, `training.epochs` data passes become epochs / m (rounded up)."""
import math

from ..lazy import F, torch
from ..schema import integer
from .base import Method


class Free(Method):
    name = "free"
    params = {"replays": integer(1)}
    defaults = {"replays": 8}

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.delta = None  # allocated at the first (full-size) minibatch; kept in the checkpoint

    def data_passes(self, epochs: int) -> int:
        return math.ceil(epochs / self.p["replays"])

    def attack_steps(self) -> int:
        return self.p["replays"]

    def step(self, trainer, x, y):
        m = self.p["replays"]
        if self.delta is None:
            self.delta = torch.zeros_like(x)
        delta = self.delta[: len(x)]  # a smaller last minibatch uses delta's leading slice
        for i in range(m):
            x_adv = torch.clamp(x + delta, 0, 1)
            logits, loss = trainer.update(x_adv, lambda logits: F.cross_entropy(logits, y), within_batch=(i + 1) / m,
                                          measure=i == m - 1)
            # the gradient w.r.t. delta passes the box clamp only where x + delta was inside [0, 1]
            inside = (x + delta >= 0) & (x + delta <= 1)
            delta = torch.clamp(delta + self.eps * torch.sign(trainer.input_grad * inside), -self.eps, self.eps)
            if i == m - 1:
                trainer.record(loss, adv=(logits, y))
        self.delta[: len(x)] = delta.detach()

    def state_dict(self) -> dict:
        # under torchrun each rank holds its shard's rows: the checkpoint holds the global batch's
        return {"delta": None if self.delta is None else self.world.gather(self.delta.detach()).cpu()}

    def load_state_dict(self, state: dict) -> None:
        delta = state["delta"]
        self.delta = None if delta is None else delta[self.world.shard(len(delta))].to(self.device)

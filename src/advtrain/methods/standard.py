"""Standard (clean) training: the non-robust baseline."""
import torch.nn.functional as F

from .base import Method


class Standard(Method):
    name = "standard"

    def step(self, trainer, x, y):
        logits, loss = trainer.update(x, lambda logits: F.cross_entropy(logits, y))
        trainer.record(loss, clean=(logits, y))

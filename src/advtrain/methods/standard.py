"""Standard (clean) training: the non-robust baseline, and the way a teacher-based method's teacher is pretrained.

With `holdout: N` the last N training images are kept out of training and the clean accuracy on them is reported
each epoch (a teacher holds out the images its student's check uses: Method.teacher_recipe)."""

from ..attacks import predict
from ..lazy import F
from ..schema import integer
from .base import Method


class Standard(Method):
    name = "standard"
    threat_models = ("Linf", "L2")  # it never attacks
    selection_metric = "val_clean_acc"
    held_out_key = "holdout"
    params = {"holdout": integer(0)}
    defaults = {"holdout": 0}

    def step(self, trainer, x, y):
        logits, loss = trainer.update(x, lambda logits: F.cross_entropy(logits, y))
        trainer.record(loss, clean=(logits, y))

    def end_epoch(self, trainer, epoch, metrics):
        if trainer.holdout is None:
            return {}
        x, y = trainer.holdout
        trainer.model.eval()
        acc = (predict(trainer.model, x, autocast=trainer.autocast) == y).sum().item() / len(y)
        trainer.model.train()
        return {"holdout_acc": acc}

"""DYNAT, dynamic-label adversarial training (Liu et al. 2024): a teacher trained on CLEAN images gives the student,
which is adversarially trained, its labels: the teacher's hard prediction on the clean image, recomputed every step,
weak at first and stronger as the teacher learns ("weak to strong").

Per minibatch:
  teacher forward on clean x  -> dynamic labels l = argmax teacher(x)
  inner (student in eval mode): x_adv = x + 0.001 N(0, 1); K steps of alpha on CE(student(x_adv), l), box/project
  outer (student in train mode): CE(teacher(x), y) + CE(student(x_adv), l), teacher and student in ONE optimizer.
`teacher_update: frozen` keeps the (pretrained) teacher fixed: the loss is then CE(student(x_adv), l) alone.
The teacher comes from the `pretrain` stage (models/teachers/dynat_<dataset>.pt, `teacher_epochs` of clean training;
0 reproduces the reference, which trains the teacher from scratch alongside the student)."""
from __future__ import annotations

from ..attacks import predict, project_box
from ..lazy import F, torch
from ..models import MODELS
from ..schema import choice, integer, number, optional
from .base import Method


class DYNAT(Method):
    name = "dynat"
    params = {"steps": integer(0), "alpha": optional(number(0, 1, lo_open=True)), "teacher_model": optional(choice(*MODELS)),
              "teacher_epochs": integer(0), "teacher_update": choice("concurrent", "frozen"), "check_points": integer(0)}
    defaults = {"steps": 10, "alpha": None, "teacher_model": None, "teacher_epochs": 0, "teacher_update": "concurrent",
                "check_points": 512}
    needs_teacher = True
    held_out_key = "check_points"  # held-out training images for the teacher's clean accuracy

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.teacher = None

    @classmethod
    def teacher_recipe(cls, params: dict) -> dict:
        # the teacher never trains on the images its accuracy is checked on
        return {"model": params["teacher_model"], "epochs": params["teacher_epochs"], "holdout": params["check_points"]}

    def attack_steps(self) -> int:
        return self.p["steps"]

    def attach_teacher(self, trainer, teacher: torch.nn.Module) -> None:
        """Put the teacher on the device; a concurrent teacher joins the student's optimizer (one SGD, as the reference)."""
        self.teacher = teacher.to(self.device).use_channels_last(trainer.channels_last)
        if self.p["teacher_update"] == "concurrent":
            trainer.optimizer.add_param_group({"params": list(self.teacher.parameters())})
        else:
            self.teacher.eval().requires_grad_(False)

    def step(self, trainer, x, y):
        concurrent = self.p["teacher_update"] == "concurrent"
        self.teacher.train(concurrent)
        with torch.set_grad_enabled(concurrent), trainer.autocast():
            t_logits = self.teacher(x).float()
        labels = t_logits.detach().argmax(1)  # the dynamic labels: recomputed every step, never the ground truth
        model, steps = trainer.model, self.attack_steps()
        with trainer.attack_mode("eval"):
            x_adv = project_box(x + 0.001 * trainer.normal_noise(x), x, self.eps)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                with trainer.autocast():
                    logits = model(x_adv)
                grad, = torch.autograd.grad(F.cross_entropy(logits.float(), labels), x_adv)
                x_adv = project_box(x_adv.detach() + self.alpha * grad.sign(), x, self.eps)
        trainer.count_passes(steps + concurrent, len(x))  # + the teacher's own forward/backward

        def loss_fn(logits):
            loss = F.cross_entropy(logits, labels)
            return loss + F.cross_entropy(t_logits, y) if concurrent else loss

        s_logits, loss = trainer.update(x_adv, loss_fn)
        trainer.record(loss, adv=(s_logits, y))
        self._agree += (labels == y).sum()
        self._seen += len(y)

    def begin_epoch(self) -> None:
        self._agree = torch.zeros((), dtype=torch.long, device=self.device)
        self._seen = 0

    def end_epoch(self, trainer, epoch, metrics):
        agree, seen = self.world.sum(torch.stack([self._agree, torch.tensor(self._seen, device=self.device)])).tolist()
        out = {"label_agreement": agree / max(1, seen)}
        if trainer.holdout is not None:
            x, y = trainer.holdout
            self.teacher.eval()
            out["teacher_acc"] = (predict(self.teacher, x, autocast=trainer.autocast) == y).sum().item() / len(y)
        return out

    def epoch_sums(self) -> dict:
        return {"agree": self._agree, "seen": self._seen}

    def load_epoch_sums(self, sums: dict) -> None:
        self._agree = sums["agree"].to(self.device, torch.long)
        self._seen = int(sums["seen"])

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])

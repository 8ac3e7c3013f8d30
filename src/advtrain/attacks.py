"""L-inf attacks on [0, 1] images: the building blocks every training method and the cheap evaluations share.

"box" = clamp to [0, 1]; "project" = clamp the perturbation to [-eps, eps] (ALGORITHMS.md's vocabulary).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F


def project_box(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The closest point of the eps-ball around x that is also a valid image."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW's margin: max over wrong classes of z_j minus z_y (positive means misclassified); mean over the batch."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.size(1)).bool(), float("-inf")).amax(1)
    return (wrong - correct).mean()


LOSSES: dict[str, Callable] = {"ce": lambda logits, y: F.cross_entropy(logits, y), "margin": margin_loss}


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        loss: str = "ce", random_start: bool = True, autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """K steps of x_adv <- box(x + project(x_adv + alpha * sign(grad) - x)) from a uniform random start.

    Only the input gradient is computed (torch.autograd.grad), so the parameters' .grad stay untouched.
    The caller chooses the model's mode (eval for the Madry recipe)."""
    loss_fn = LOSSES[loss]
    x = x.detach()
    x_adv = uniform_start(x, eps) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            logits = model(x_adv)
        grad, = torch.autograd.grad(loss_fn(logits.float(), y), x_adv)
        x_adv = project_box(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500, autocast=contextlib.nullcontext) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        with autocast():
            out.append(model(x[i:i + batch_size]).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def worst_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
               restarts: int = 1, loss: str = "ce", batch_size: int = 500,
               autocast: Callable = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD with restarts, keeping each point's worst case: returns (robust mask, adversarial images).

    A point counts as robust only if it is classified correctly on the clean image and after every restart."""
    model.eval()
    x_worst = x.clone()
    robust = predict(model, x, batch_size, autocast) == y
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            x_adv = pgd(model, x[b], y[b], eps, alpha, steps, loss=loss, autocast=autocast)
            fooled = predict(model, x_adv, batch_size, autocast) != y[b]
            x_worst[b[fooled]] = x_adv[fooled]
            robust[b[fooled]] = False
    return robust, x_worst

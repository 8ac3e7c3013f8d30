"""Attacks on [0, 1] images under a threat model (an L-inf or L2 ball of radius eps around each image): the building
blocks every training method and the cheap evaluations share.

"box" = clamp to [0, 1]; "project" = back into the eps-ball (ALGORITHMS.md's vocabulary).
Random starts take a uniform [0, 1) noise tensor shaped like the batch when the caller supplies one: data-parallel
training draws it for the whole global batch and hands each rank its shard, so 2 ranks draw what 1 process draws."""
from __future__ import annotations

import contextlib
from typing import Callable

from .lazy import F, torch


def project_box(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The closest point of the L-inf eps-ball around x that is also a valid image."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A uniform random point of the L-inf eps-ball around x, inside the box."""
    noise = torch.rand_like(x) if noise is None else noise
    return torch.clamp(x + (2 * noise - 1) * eps, 0.0, 1.0)


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms, shaped to broadcast over (B, C, H, W)."""
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


class Ball:
    """A threat model: where an attack starts, how it steps, and how it is kept admissible."""

    norm: str

    def __init__(self, eps: float):
        self.eps = eps

    def start(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def ascend(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Linf(Ball):
    norm = "Linf"

    def start(self, x, noise=None):
        return uniform_start(x, self.eps, noise)

    def ascend(self, x_adv, grad, alpha):
        return x_adv + alpha * grad.sign()

    def project(self, x_adv, x):
        return project_box(x_adv, x, self.eps)


class L2(Ball):
    """The L2 ball: steps along the normalised gradient; the start is a random point inside the ball (a uniform cube
    draw scaled to a typical norm of eps / sqrt(3)); projection rescales the perturbation, then the box clamps."""

    norm = "L2"

    def start(self, x, noise=None):
        noise = torch.rand_like(x) if noise is None else noise
        d = x[0].numel()
        return self.project(x + (2 * noise - 1) * self.eps / d ** 0.5, x)

    def ascend(self, x_adv, grad, alpha):
        return x_adv + alpha * grad / _norms(grad)

    def project(self, x_adv, x):
        delta = x_adv - x
        delta = delta * torch.clamp(self.eps / _norms(delta), max=1.0)
        return torch.clamp(x + delta, 0.0, 1.0)


BALLS: dict[str, type[Ball]] = {"Linf": Linf, "L2": L2}


def ball(norm: str, eps: float) -> Ball:
    return BALLS[norm](eps)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW's margin: max over wrong classes of z_j minus z_y (positive means misclassified); mean over the batch."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.size(1)).bool(), float("-inf")).amax(1)
    return (wrong - correct).mean()


LOSSES: dict[str, Callable] = {"ce": lambda logits, y: F.cross_entropy(logits, y), "margin": margin_loss}


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        loss: str = "ce", random_start: bool = True, autocast: Callable = contextlib.nullcontext,
        norm: str = "Linf", noise: torch.Tensor | None = None) -> torch.Tensor:
    """K steps of x_adv <- project(ascend(x_adv, grad, alpha)) in the `norm` eps-ball, from a random start.

    Only the input gradient is computed (torch.autograd.grad), so the parameters' .grad stay untouched.
    The caller chooses the model's mode (eval for the Madry recipe)."""
    threat = ball(norm, eps)
    loss_fn = LOSSES[loss]
    x = x.detach()
    x_adv = threat.start(x, noise) if random_start else x.clone()
    # One autocast region around all K forwards: autocast caches its casts of the weights (leaves that require
    # grad) until its outermost region ends, so each weight is cast to bf16 once per attack instead of once per step;
    # the weights do not change during the attack, so the forwards compute what per-step regions compute. The
    # backward and the step run with autocast off, as they did outside the per-step regions (an inner region that
    # is off keeps the cache).
    with autocast():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            with torch.autocast(x.device.type, enabled=False):
                grad, = torch.autograd.grad(loss_fn(logits.float(), y), x_adv)
                x_adv = threat.project(threat.ascend(x_adv.detach(), grad, alpha), x)
    return x_adv.detach()


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float [0, 1]: uint8 pixels divided by 255, float images as they are. Held-out and test points are
    kept as uint8 (a quarter of float32's memory: 1.5 GB, not 6 GB, for 10,000 images at 224 px) and made float a
    batch at a time, which gives the same numbers as converting them all at once."""
    return x.float().div(255) if x.dtype == torch.uint8 else x


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The predicted class of every image of x (float [0, 1], or uint8 pixels), batch by batch."""
    out = []
    with torch.no_grad():  # a block, not the decorator: a decorator would load torch when this module is imported
        for i in range(0, len(x), batch_size):
            with autocast():
                out.append(model(as_float(x[i:i + batch_size])).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def worst_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
               restarts: int = 1, loss: str = "ce", batch_size: int = 500,
               autocast: Callable = contextlib.nullcontext, norm: str = "Linf",
               generator: torch.Generator | None = None,
               adversarial: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PGD with restarts, keeping each point's worst case: returns (robust mask, adversarial images; None without
    `adversarial`, which then never holds a float copy of x). x: float [0, 1] images, or uint8 pixels (made float
    a batch at a time).

    A point counts as robust only if it is classified correctly on the clean image and after every restart.
    With a `generator`, the random starts come from it (and leave the global random stream untouched)."""
    model.eval()
    x_worst = (x.clone() if x.is_floating_point() else as_float(x)) if adversarial else None
    robust = predict(model, x, batch_size, autocast) == y
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            noise = None if generator is None else torch.rand(x[b].shape, generator=generator, device=x.device)
            x_adv = pgd(model, as_float(x[b]), y[b], eps, alpha, steps, loss=loss, autocast=autocast, norm=norm,
                        noise=noise)
            fooled = predict(model, x_adv, batch_size, autocast) != y[b]
            if x_worst is not None:
                x_worst[b[fooled]] = x_adv[fooled]
            robust[b[fooled]] = False
    return robust, x_worst

"""PGD, the building block of every method: stays in the eps-ball and the image box, and really raises the loss."""
import torch
import torch.nn.functional as F

from advtrain.attacks import margin_loss, pgd, project_box, worst_case
from advtrain.models import build_model


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = build_model("small_cnn", (1, 28, 28), 10, (0.5,), (0.5,), width=8, hidden=32, kernel=3).eval()
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    return model, x, y


def test_pgd_stays_in_eps_ball_and_box_and_raises_loss():
    model, x, y = _model_and_batch()
    eps = 0.1
    x_adv = pgd(model, x, y, eps=eps, alpha=0.025, steps=10)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
        rand = F.cross_entropy(model(project_box(x + eps * torch.randn_like(x).sign(), x, eps)), y)
    assert adv > clean + 0.05, (clean.item(), adv.item())
    assert adv > rand, "PGD must beat a random corner of the eps-ball"


def test_pgd_leaves_parameter_gradients_untouched():
    model, x, y = _model_and_batch()
    pgd(model, x, y, eps=0.1, alpha=0.025, steps=2)
    assert all(p.grad is None for p in model.parameters())


def test_margin_pgd_and_worst_case_over_restarts():
    model, x, y = _model_and_batch(1)
    y = model(x).argmax(1).detach()  # every point starts correctly classified
    x_adv = pgd(model, x, y, eps=0.1, alpha=0.025, steps=10, loss="margin")
    assert margin_loss(model(x_adv), y) > margin_loss(model(x), y)
    robust1, _ = worst_case(model, x, y, 0.1, 0.025, 5, restarts=1)
    robust3, x_worst = worst_case(model, x, y, 0.1, 0.025, 5, restarts=3)
    assert robust3.sum() <= robust1.sum() + 2  # more restarts cannot make many more points robust
    fooled = ~robust3
    assert (model(x_worst[fooled]).argmax(1) != y[fooled]).all(), "kept worst cases really fool the model"
    assert (x_worst - x).abs().max() <= 0.1 + 1e-6


def test_pgd_under_autocast_casts_each_weight_once_and_matches_per_step_autocast():
    """Under bf16 autocast, PGD keeps one autocast region over its K forwards, so autocast's cache casts each weight
    once per attack, not once per step; the result equals K forwards each in their own region (the weights do not
    change during the attack). The casts are observed at the dispatcher, on the real model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from advtrain.attacks import ball

    model, x, y = _model_and_batch()
    weights = {p.data_ptr() for p in model.parameters()}
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    class WeightCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                WeightCasts.n += 1
            return func(*args, **(kwargs or {}))

    noise = torch.rand_like(x)
    for steps in (1, 5):
        WeightCasts.n = 0
        with WeightCasts():
            x_adv = pgd(model, x, y, 0.1, 0.025, steps, autocast=autocast, noise=noise)
        assert WeightCasts.n == len(weights), (steps, WeightCasts.n)

    threat = ball("Linf", 0.1)  # the same K steps, each forward in its own autocast region
    x_ref = threat.start(x, noise)
    for _ in range(5):
        x_ref.requires_grad_(True)
        with autocast():
            logits = model(x_ref)
        grad, = torch.autograd.grad(F.cross_entropy(logits.float(), y), x_ref)
        x_ref = threat.project(threat.ascend(x_ref.detach(), grad, 0.025), x)
    assert torch.equal(x_adv, x_ref)

"""The methods' semantics, each test written to fail on a plausible mistake (ALGORITHMS.md states the methods)."""
import math

import pytest
import torch
import yaml

from advtrain.config import Params
from advtrain.magnitude import MagnitudeRule
from advtrain.trainer import Trainer
from conftest import ROOT, TINY, deep_update

EPS = 0.1


def config(method: str, method_params: dict | None = None, training: dict | None = None):
    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    # at the most specific level (method on this dataset), so the repo's own per-method recipes do not win
    # no validation split: these tests train on a few dozen synthetic images
    ours = {**(method_params or {}), "training": {"epochs": 2, "val_points": 0, "select": "last", **(training or {})}}
    raw = deep_update(raw, {"methods": {method: {"fashionmnist": ours}}})
    return Params(raw).resolve(method, "fashionmnist")


def synthetic(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


class Spy(Trainer):
    """The real trainer, remembering what each optimizer step was given."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.inputs: list[torch.Tensor] = []

    def update(self, inputs, loss_fn, within_batch=0.0, measure=True):
        self.inputs.append(inputs.detach().clone())
        return super().update(inputs, loss_fn, within_batch, measure)


def spy(cfg, tmp_path, n=64):
    x, y = synthetic(n)
    t = Spy(cfg, x, y, tmp_path / "ckpt.pt", log=lambda m: None)
    t.begin_epoch()
    return t


def batch(seed=1, n=16):
    x, y = synthetic(n, seed)
    return x.float() / 255, y


# --- FREE -------------------------------------------------------------------------------------------------------

def test_free_replays_m_times_and_keeps_its_perturbation_across_minibatches(tmp_path):
    t = spy(config("free", {"replays": 3}), tmp_path)
    m = t.method
    x1, y1 = batch(1)
    m.step(t, x1, y1)
    assert t._steps == 3 and len(t.inputs) == 3  # m optimizer steps per minibatch
    carried = m.delta[:16].clone()
    assert carried.abs().max() == pytest.approx(EPS)  # steps of size eps, projected to the ball
    x2, y2 = batch(2)
    m.step(t, x2, y2)
    assert torch.allclose(t.inputs[3], torch.clamp(x2 + carried, 0, 1))  # the next minibatch starts from it
    assert t._steps == 6


def test_free_counts_epochs_in_data_passes():
    cfg = config("free", {"replays": 4}, {"epochs": 10})
    assert math.ceil(10 / 4) == Trainer(cfg, *synthetic(), "unused.pt", log=lambda m: None).epochs == 3


# --- DEAT and the magnitude rule --------------------------------------------------------------------------------

def test_deat_draws_a_fresh_start_for_every_minibatch(tmp_path):
    t = spy(config("deat", {"r_max": 4}), tmp_path)
    t.method.rule.count = 3
    x, y = batch(1)
    t.method.step(t, x, y)
    t.method.step(t, x, y)  # the same minibatch again
    first, again = t.inputs[0], t.inputs[3]
    for start in (first, again):
        assert (start - x).abs().max() <= EPS + 1e-6 and (start - x).abs().max() > EPS / 2  # uniform in the ball
    assert not torch.allclose(first, again)  # a new draw, not the perturbation left by the previous replays
    assert t._steps == 6


def test_magnitude_rule_follows_the_threshold():
    rule = MagnitudeRule(gamma=1.01, maximum=8, start=1)
    counts = [rule.count]
    # epoch:   0    1     2     3      4      5     6
    for e, g in enumerate([100, 100, 100.5, 102.0, 101.0, 103.1, 104.2]):
        counts.append(rule.update(e, g))
    # r = 1 in epoch 0, 2 from epoch 1; threshold 101 after epoch 1; 100.5 stays put; 102 > 101 grows (thr 103.02);
    # 101 stays; 103.1 > 103.02 grows (thr 104.131); 104.2 > 104.131 grows
    assert counts == [1, 2, 2, 2, 3, 3, 4, 5]


def test_magnitude_rule_never_exceeds_its_maximum_and_stays_put_on_flat_magnitude():
    rule = MagnitudeRule(gamma=1.01, maximum=4, start=0)
    counts = [rule.update(e, 100 * 1.1 ** e) for e in range(20)]
    assert max(counts) == 4 and counts[-1] == 4
    flat = MagnitudeRule(gamma=1.01, maximum=8, start=1)
    assert [flat.update(e, 50.0) for e in range(10)] == [2] * 10


def test_deat_fixed_schedule_and_step_size():
    rule = MagnitudeRule(gamma=1.01, maximum=4, start=1, every=3)
    assert [rule.update(e, 1.0) for e in range(12)] == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]  # DEAT-3: 1 + floor(e/3)
    m = Trainer(config("deat", {"alpha": 0.02}), *synthetic(), "unused.pt", log=lambda m: None).method
    for r in range(1, 9):
        m.rule.count = r
        assert m.step_size() == max(EPS / r, 0.02)  # alpha_r = max(eps / r, alpha)


def test_deat_measures_the_magnitude_at_the_last_replay_only(tmp_path):
    t = spy(config("deat", {"r_max": 4}), tmp_path)
    t.method.rule.count = 3
    x, y = batch(1)
    t.method.step(t, x, y)
    last = t.input_grad.abs().sum().item()
    assert t._acc["grad_l1"].item() == pytest.approx(last, rel=1e-5)


# --- M+PGD, M+TRADES ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["mpgd", "mtrades"])
def test_magnitude_driven_pgd_and_trades_start_with_zero_attack_steps(method, tmp_path):
    x, y = synthetic(200)
    t = Trainer(config(method, training={"epochs": 2, "batch_size": 50}), x, y, tmp_path / "c.pt", log=lambda m: None)
    hist = t.fit()
    assert [h["attack_steps"] for h in hist] == [0, 1]
    extra = 2 if method == "mtrades" else 1  # TRADES trains on clean + adversarial: two minibatches of work
    assert hist[0]["passes"] == 4 * extra  # plain training: no attack passes at all
    assert hist[1]["passes"] == 4 * (1 + extra)


def test_mpgd_step_size_follows_the_count():
    m = Trainer(config("mpgd"), *synthetic(), "unused.pt", log=lambda m: None).method
    for k, want in [(0, EPS), (1, EPS), (2, EPS / 2), (4, 0.025), (7, 0.025)]:  # max(eps / K, alpha=0.025)
        m.rule.count = k
        assert m.step_size() == pytest.approx(want)


# --- resume --------------------------------------------------------------------------------------------------------

class Kill(Exception):
    pass


@pytest.mark.parametrize("method", ["deat", "free", "mpgd"])
def test_a_resumed_run_continues_the_schedule_and_ends_with_the_same_weights(method, tmp_path):
    cfg = config(method, {"gamma": 0.5} if method != "free" else {"replays": 2},
                 {"epochs": 4 if method != "free" else 8, "batch_size": 50})
    x, y = synthetic(200)
    whole = Trainer(cfg, x, y, tmp_path / "whole.pt", log=lambda m: None)
    full = whole.fit()

    class KillAfter:
        def on_start(self, trainer, resumed):
            pass

        def on_epoch(self, trainer, metrics):
            if metrics["epoch"] == 2:
                raise Kill  # after epoch 2's checkpoint was written

    first = Trainer(cfg, x, y, tmp_path / "part.pt", callbacks=[KillAfter()], log=lambda m: None)
    with pytest.raises(Kill):
        first.fit()
    second = Trainer(cfg, x, y, tmp_path / "part.pt", log=lambda m: None)
    resumed = second.fit()
    assert second.epoch == whole.epoch and len(resumed) == len(full)
    assert [h["attack_steps"] for h in resumed] == [h["attack_steps"] for h in full]
    for a, b in zip(whole.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


# --- FGSM's catastrophic-overfitting guard --------------------------------------------------------------------------

def separable(n=600, seed=0):
    """Two classes no eps=0.1 perturbation can confuse: dark images (class 0) and bright ones (class 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (torch.where(y.view(-1, 1, 1, 1) == 1, 200, 50) + torch.randint(-20, 21, (n, 1, 28, 28), generator=g))
    return x.clamp(0, 255).to(torch.uint8), y


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_fgsm_overfitting_check_fires_when_pgd_accuracy_collapses(action, tmp_path):
    cfg = config("fgsm", {"check_points": 100, "on_overfit": action}, {"epochs": 3, "batch_size": 50, "lr": 0.02})
    t = Trainer(cfg, *separable(), tmp_path / "c.pt", log=lambda m: None)
    t.epochs = 1
    t.fit()  # one healthy epoch: the held-out PGD accuracy is high
    assert t.history[0]["holdout_pgd_acc"] > 0.9 and t.history[0]["overfit"] == 0
    good = {k: v.clone() for k, v in t.model.state_dict().items()}
    last = t.model.net.classifier[-1]
    with torch.no_grad():  # the collapse: a model that answers "class 0" whatever it sees
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0] + [0.0] * 9))
    out = t.method.end_epoch(t, 1, {})
    assert out["overfit"] == 1 and out["holdout_pgd_acc"] < 0.7
    assert all(torch.equal(v, good[k]) for k, v in t.model.state_dict().items())  # rolled back to the good epoch
    assert (t.stop_reason is not None) == (action == "stop")
    if action == "stop":
        assert "catastrophic overfitting" in t.stop_reason


# --- DYNAT -----------------------------------------------------------------------------------------------------------

def constant_teacher(cls: int):
    """A teacher that answers `cls` whatever it sees."""
    from advtrain.models import build_model

    t = build_model("small_cnn", (1, 28, 28), 10, (0.286,), (0.353,), width=8, hidden=64, kernel=3)
    with torch.no_grad():
        t.net.classifier[-1].weight.zero_()
        t.net.classifier[-1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 10).float() * 10)
    return t


def test_dynat_learns_the_teachers_labels_not_the_ground_truth(tmp_path):
    x, y = synthetic(400)
    y = torch.where(y == 7, 0, y)  # the ground truth never says 7; the teacher always does
    cfg = config("dynat", {"teacher_update": "frozen", "steps": 1, "check_points": 0},
                 {"epochs": 3, "batch_size": 50, "lr": 0.05})
    t = Trainer(cfg, x, y, tmp_path / "c.pt", log=lambda m: None, teacher=constant_teacher(7))
    hist = t.fit()
    assert all(h["label_agreement"] == 0 for h in hist)  # the dynamic labels never equal the ground truth
    t.model.eval()
    with torch.no_grad():
        pred = t.model(x[:100].float() / 255).argmax(1)
    assert (pred == 7).float().mean() > 0.95  # the student learned the teacher's label


@pytest.mark.parametrize("update", ["concurrent", "frozen"])
def test_dynat_teacher_moves_only_when_concurrent(update, tmp_path):
    from advtrain.models import build_model

    teacher = build_model("small_cnn", (1, 28, 28), 10, (0.286,), (0.353,), width=8, hidden=64, kernel=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = config("dynat", {"teacher_update": update, "steps": 1, "check_points": 50}, {"epochs": 1, "batch_size": 50})
    t = Trainer(cfg, *synthetic(200), tmp_path / "c.pt", log=lambda m: None, teacher=teacher)
    hist = t.fit()
    changed = any(not torch.equal(v, before[k]) for k, v in t.method.teacher.state_dict().items())
    assert changed == (update == "concurrent")
    assert 0 <= hist[0]["teacher_acc"] <= 1
    # concurrent: the teacher's parameters are in the student's optimizer (one SGD, as the reference)
    assert (len(t.optimizer.param_groups) == 2) == (update == "concurrent")


def test_dynat_refuses_to_start_without_its_teacher(tmp_path):
    from advtrain.errors import UserError

    with pytest.raises(UserError, match="advtrain pretrain dynat fashionmnist"):
        Trainer(config("dynat"), *synthetic(), tmp_path / "c.pt", log=lambda m: None)


def test_learning_rate_schedules_are_stepped_per_optimizer_step(tmp_path):
    from advtrain.trainer import lr_at

    tr = {"lr": 0.2, "schedule": "cyclic", "cyclic_peak": 0.4, "milestones": [], "lr_decay": 0.1}
    assert lr_at(0.2, tr) == pytest.approx(0.1) and lr_at(0.4, tr) == pytest.approx(0.2) and lr_at(1.0, tr) == 0
    tr = {"lr": 0.1, "schedule": "piecewise", "milestones": [0.5, 0.75], "lr_decay": 0.1, "cyclic_peak": 0.4}
    assert [lr_at(p, tr) for p in (0.25, 0.5, 0.8)] == pytest.approx([0.1, 0.01, 0.001])
    # FREE's replays advance the schedule inside a minibatch: 2 batches x 4 replays = 8 distinct steps of a cycle
    cfg = config("free", {"replays": 4}, {"epochs": 4, "batch_size": 32, "schedule": "cyclic", "lr": 0.1})
    seen = []

    class Watch(Trainer):
        def update(self, *a, **k):
            out = super().update(*a, **k)
            seen.append(self.optimizer.param_groups[0]["lr"])
            return out

    Watch(cfg, *synthetic(64), tmp_path / "c.pt", log=lambda m: None).fit()
    tr = Trainer(cfg, *synthetic(64), tmp_path / "d.pt", log=lambda m: None).tr
    assert seen == pytest.approx([lr_at((i + 1) / 8, tr) for i in range(8)])  # each step its own point of the cycle
    assert seen[0] > 0 and seen[-1] == 0

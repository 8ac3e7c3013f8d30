"""Results a reviewer accepts: model selection on held-out training images (never the test split), EMA weights,
intervals and paired tests, the L2 threat model, and a checkpoint trained elsewhere evaluated the same way."""
import json
from pathlib import Path
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from advtrain import cli, paths
from advtrain.attacks import L2, pgd
from advtrain.methods import METHODS
from advtrain.methods.fgsm import FGSM
from advtrain.methods.pgd import PGD
from advtrain.models import build_model
from advtrain.sources import SOURCES
from advtrain.stats import mcnemar_exact, wilson
from advtrain.trainer import Trainer
from conftest import ROOT
from test_methods import config, separable
from toy_source import Toy


class Snapshots:
    """A trainer callback keeping the published weights at the end of every epoch."""

    def __init__(self):
        self.states = {}

    def on_start(self, trainer, resumed):
        pass

    def on_epoch(self, trainer, metrics):
        self.states[metrics["epoch"]] = {k: v.clone() for k, v in trainer.published().state_dict().items()}


def collapse_in_the_last_epoch(trainer, epoch) -> None:
    """A constant answer after the last epoch, as catastrophic overfitting leaves a model."""
    if epoch + 1 == trainer.epochs:
        last = trainer.model.net.classifier[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([5.0] + [0.0] * 9))


class CollapsingPGD(PGD):
    """PGD-AT whose last epoch ends in a collapsed model (a constant answer), as catastrophic overfitting does."""

    def end_epoch(self, trainer, epoch, metrics):
        collapse_in_the_last_epoch(trainer, epoch)
        return super().end_epoch(trainer, epoch, metrics)


@pytest.mark.parametrize("select", ["best", "last"])
def test_select_best_keeps_the_best_validated_epoch_and_last_the_last(select, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "pgd", CollapsingPGD)
    cfg = config("pgd", {"steps": 1}, {"epochs": 3, "batch_size": 50, "lr": 0.02, "val_points": 100,
                                       "val_pgd_steps": 2, "select": select})
    snaps = Snapshots()
    t = Trainer(cfg, *separable(), tmp_path / "c.pt", callbacks=[snaps], log=lambda m: None)
    hist = t.fit()
    robust = [h["val_pgd_acc"] for h in hist]
    assert max(robust[:2]) > 0.9 and robust[2] < 0.7, robust  # the last epoch collapsed on the held-out images
    state, how = t.selected()
    want = int(max(range(3), key=lambda i: (robust[i], -i))) + 1 if select == "best" else 3
    assert how["select"] == select and how["epoch"] == want, (how, robust)
    for k, v in snaps.states[want].items():
        assert torch.equal(state[k], v), k
    if select == "best":
        assert how["metric"] == "val_pgd_acc" and how["value"] == robust[want - 1] and "epoch" in how["why"]


class CollapsingFGSM(FGSM):
    """FGSM-RS whose last epoch ends in a collapsed model (a constant answer), which its overfitting guard rolls
    back."""

    def end_epoch(self, trainer, epoch, metrics):
        collapse_in_the_last_epoch(trainer, epoch)
        return super().end_epoch(trainer, epoch, metrics)


@pytest.mark.parametrize("select", ["last", "best"])
def test_a_rollback_publishes_the_earlier_epochs_ema_weights_and_names_that_epoch(select, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "fgsm", CollapsingFGSM)
    cfg = config("fgsm", {"check_points": 100, "on_overfit": "stop"},
                 {"epochs": 3, "batch_size": 50, "lr": 0.02, "ema_decay": 0.9, "select": select,
                  "val_points": 100 if select == "best" else 0, "val_pgd_steps": 2})
    snaps = Snapshots()
    t = Trainer(cfg, *separable(), tmp_path / "c.pt", callbacks=[snaps], log=lambda m: None)
    t.fit()
    good = t.method.best_epoch  # the epoch the guard rolled back to
    assert t.history[-1]["overfit"] == 1 and t.stop_reason and good < 3, t.history
    assert t.history[-1]["rolled_back_to"] == good
    # the EMA (what is published) went back with the model: the published weights are that epoch's
    for k, v in snaps.states[good].items():
        assert torch.equal(t.published().state_dict()[k], v), k
    state, how = t.selected()
    assert how["epoch"] < 3 and "last epoch (3)" not in how["why"], how
    if select == "last":
        assert how["epoch"] == good and f"epoch {good}'s weights, rolled back" in how["why"], how
    for k, v in snaps.states[how["epoch"]].items():
        assert torch.equal(state[k], v), k


def toy_project(tmp_path, monkeypatch, source, method: str, dataset: dict, method_settings: dict | None = None):
    """params.yaml in tmp_path (the working folder, with its own MLflow store) running `method` on a toy source."""
    monkeypatch.setitem(SOURCES, source.name, source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.delenv("ADVTRAIN_PARAMS", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["runs"] = {"datasets": [source.name], "methods": [method], "teacher_methods": [], "seeds": [0]}
    params["datasets"][source.name] = dataset
    if method_settings:
        params["methods"][method][source.name] = method_settings
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def test_the_selection_never_reads_the_test_split(tmp_path, monkeypatch):
    """Poisoning every test label changes nothing about which epoch is chosen, nor any weight."""
    toy_project(tmp_path, monkeypatch, Toy, "pgd", {
        "source": {"name": "toy", "n": 500}, "model": "small_cnn", "eps": 0.1, "alpha": 0.025,
        "training": {"epochs": 3, "batch_size": 50, "lr": 0.05, "val_points": 100, "val_pgd_steps": 2}}, {"steps": 1})
    assert cli.main(["prepare", "toy"]) == 0
    assert cli.main(["train", "pgd", "toy"]) == 0
    model = paths.model_path("pgd", "toy", 0)
    first = torch.load(model, weights_only=True)

    test_pt = tmp_path / "data/prepared/toy/test.pt"  # every test label replaced by a wrong one
    split = torch.load(test_pt, weights_only=True)
    torch.save({"images": split["images"], "labels": (split["labels"] + 1) % 10}, test_pt)
    meta = json.loads((tmp_path / "data/prepared/toy/meta.json").read_text())
    meta["sha256"]["test.pt"] = __import__("hashlib").sha256(test_pt.read_bytes()).hexdigest()
    (tmp_path / "data/prepared/toy/meta.json").write_text(json.dumps(meta))
    assert cli.main(["train", "pgd", "toy", "--restart"]) == 0
    again = torch.load(model, weights_only=True)
    assert again["meta"]["selection"] == first["meta"]["selection"] and first["meta"]["selection"]["select"] == "best"
    assert all(torch.equal(again["model"][k], v) for k, v in first["model"].items())


def test_ema_weights_equal_an_ema_computed_by_hand_from_every_step(tmp_path):
    decay = 0.9
    cfg = config("standard", {}, {"epochs": 2, "batch_size": 50, "ema_decay": decay})
    steps = []

    class Recorder(Trainer):
        def update(self, *a, **k):
            out = super().update(*a, **k)
            steps.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
            return out

    t = Recorder(cfg, *separable(200), tmp_path / "c.pt", log=lambda m: None)
    t.fit()
    assert len(steps) == 8  # 2 epochs x 4 minibatches
    ema = {k: v.clone() for k, v in steps[0].items()}  # the average starts at the first step's weights
    for w in steps[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
    published, how = t.selected()
    assert how["ema"] and how["select"] == "last"
    for k, v in ema.items():
        assert torch.allclose(published[k], v, atol=1e-6), k
    assert not torch.allclose(published["net.classifier.3.weight"], steps[-1]["net.classifier.3.weight"])


def test_pgd_l2_stays_in_the_ball_and_the_box_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 28, 28), 10, (0.5,), (0.5,), width=8, hidden=32, kernel=3).eval()
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    eps = 1.0
    x_adv = pgd(model, x, y, eps=eps, alpha=0.25, steps=10, norm="L2")
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= eps + 1e-5 and norms.mean() > 0.5 * eps
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
        rand = F.cross_entropy(model(L2(eps).start(x)), y)
    assert adv > clean + 0.05 and adv > rand


@pytest.mark.parametrize("k, n, low, high", [  # Newcombe (1998), Table I, method 3 (Wilson score, no correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0)])
def test_wilson_interval_matches_published_values(k, n, low, high):
    lo, hi = wilson(k / n, n)
    assert round(lo, 4) == low and round(hi, 4) == high


def test_mcnemar_exact_is_the_two_sided_binomial_test_of_the_discordant_pairs():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 11) == pytest.approx(2 * sum(math.comb(14, i) for i in range(4)) / 2 ** 14)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024) and mcnemar_exact(10, 0) == mcnemar_exact(0, 10)


def test_methods_without_an_l2_form_are_refused_in_one_line():
    from advtrain.config import ConfigError, Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"]["fashionmnist"]["threat_model"] = "L2"
    raw["datasets"]["fashionmnist"]["eps"] = 1.5  # an L2 radius may exceed 1
    with pytest.raises(ConfigError, match="free has no L2 form .* use one of: standard, pgd, mpgd, trades, mtrades"):
        Params(raw)
    raw["runs"]["methods"] = ["standard", "pgd", "trades"]
    raw["runs"]["teacher_methods"] = []
    assert Params(raw).resolve("pgd", "fashionmnist").threat_model == "L2"


def test_an_l2_trained_model_gets_autoattack_l2_in_its_result_and_the_report(tmp_path, monkeypatch):
    toy_project(tmp_path, monkeypatch, Toy, "pgd", {
        "source": {"name": "toy", "n": 400}, "threat_model": "L2", "model": "small_cnn", "eps": 1.0, "alpha": 0.25,
        "training": {"epochs": 1, "batch_size": 50, "lr": 0.05, "val_points": 50, "val_pgd_steps": 2},
        "evaluation": {"n_points": 40, "autoattack": "fast", "pgd_steps": 3, "cw_steps": 0}}, {"steps": 2})
    for argv in (["prepare", "toy"], ["train", "pgd", "toy"], ["evaluate", "pgd", "toy"], ["aggregate", "pgd", "toy"],
                 ["report"]):
        assert cli.main(argv) == 0, argv
    result = json.loads((tmp_path / "results/pgd_toy.json").read_text())
    assert result["threat_model"] == "L2" and result["robustbench"]["threat_model"] == "L2"
    assert result["robustbench"]["eps"] == "1" and result["autoattack"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert 0 <= result["autoattack"]["robust_acc"] <= result["clean_acc"]
    md = (tmp_path / "reports/report.md").read_text()
    assert "Threat model: L2, eps = 1" in md and "| pgd | small_cnn | 40 | 1 |" in md


class ToyRGB(Toy):
    """The toy bars in colour at 32x32, for torchvision's ImageNet-style architectures."""

    name = "toyrgb"
    shape = (3, 32, 32)
    mean, std = (0.2, 0.2, 0.2), (0.25, 0.25, 0.25)


def test_a_checkpoint_saved_by_plain_torchvision_code_is_evaluated_like_ours(tmp_path, monkeypatch):
    import torchvision

    from advtrain.prepared import load_split

    toy_project(tmp_path, monkeypatch, ToyRGB, "standard", {
        "source": {"name": "toyrgb", "n": 200}, "model": "preact_resnet18", "eps": 0.03, "alpha": 0.01,
        "training": {"val_points": 0, "select": "last"},
        "evaluation": {"n_points": 30, "autoattack": "off", "pgd_steps": 2, "cw_steps": 0}})
    assert cli.main(["prepare", "toyrgb"]) == 0
    # plain torchvision code: a ResNet-18 trained a few steps on [0, 1] images, its state dict saved as is
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x, y, _ = load_split(tmp_path / "data/prepared/toyrgb", "train")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for i in range(0, 200, 50):
        loss = F.cross_entropy(net(x[i:i + 50].float() / 255), y[i:i + 50])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    xt, yt, _ = load_split(tmp_path / "data/prepared/toyrgb", "test")
    with torch.no_grad():
        expected = (net.eval()(xt[:30].float() / 255).argmax(1) == yt[:30]).sum().item() / 30
    assert cli.main(["evaluate", "--model", "resnet18.pth", "--arch", "torchvision:resnet18", "--normalize", "inside",
                     "toyrgb"]) == 0
    result = json.loads((tmp_path / "results/external-resnet18_toyrgb.json").read_text())
    assert result["clean_acc"] == expected and result["n_points"] == 30
    assert result["external"]["arch"] == "torchvision:resnet18" and result["seeds"]["seeds"] == [0]
    assert cli.main(["evaluate", "--model", "resnet18.pth", "--arch", "small_cnn", "toyrgb"]) == 2  # wrong arch


def test_model_files_of_any_wrapping_are_evaluated_as_they_were_trained(tmp_path, monkeypatch, capsys):
    """`evaluate --model` takes this project's own model files, the settings of models.<arch>, torch.compile's and
    wrappers' key prefixes, and believes a normalisation the file states (RobustBench's Sequential(normaliser,
    model)); a file that does not fit says which tensor and which shapes."""
    from advtrain.models import MODELS
    from advtrain.prepared import load_split

    toy_project(tmp_path, monkeypatch, Toy, "standard", {
        "source": {"name": "toy", "n": 400}, "model": "small_cnn", "eps": 0.1, "alpha": 0.025,
        "training": {"epochs": 1, "batch_size": 50, "lr": 0.05, "val_points": 0, "select": "last"},
        "evaluation": {"n_points": 40, "autoattack": "off", "pgd_steps": 2, "cw_steps": 0}})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["models"]["small_cnn"] = {"width": 8, "hidden": 32, "kernel": 3}  # not the architecture's defaults
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for argv in (["prepare", "toy"], ["train", "standard", "toy"], ["evaluate", "standard", "toy"]):
        assert cli.main(argv) == 0, argv
    ours = json.loads((tmp_path / "results/seeds/standard_toy/seed0.json").read_text())["clean_acc"]

    def evaluated(file, *extra) -> dict:
        name = Path(file).stem  # a safe name (evaluate --name refuses a path)
        assert cli.main(["evaluate", "--model", file, "--arch", "small_cnn", "--name", name, *extra, "toy"]) == 0, \
            capsys.readouterr().err
        return json.loads((tmp_path / f"results/{name}_toy.json").read_text())

    own = evaluated("models/standard_toy_seed0.pt")  # this project's model file (keys normalize.*, net.*)
    assert own["clean_acc"] == ours and own["external"]["normalize"] == "file", own["external"]
    net = MODELS["small_cnn"].build(1, 10, width=8, hidden=32)
    saved = torch.load(tmp_path / "models/standard_toy_seed0.pt", weights_only=True)["model"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in saved.items() if k.startswith("net.")})
    torch.save(net.state_dict(), tmp_path / "plain.pt")  # width 8, as models.small_cnn says
    assert evaluated("plain.pt")["clean_acc"] == ours
    torch.save(torch.compile(net).state_dict(), tmp_path / "compiled.pt")  # keys _orig_mod.*
    assert evaluated("compiled.pt")["clean_acc"] == ours
    wrapper = torch.nn.Module()
    wrapper.model = net
    torch.save({"state_dict": wrapper.state_dict()}, tmp_path / "wrapped.pt")  # keys model.*
    assert evaluated("wrapped.pt")["clean_acc"] == ours

    class Normalizer(torch.nn.Module):  # RobustBench's ImageNormalizer: the model takes [0, 1] images
        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    rb = torch.nn.Sequential(Normalizer([0.3], [0.4]), net).eval()  # not the dataset's mean/std (0.2, 0.25)
    torch.save(rb.state_dict(), tmp_path / "rb.pt")  # keys 0.mean, 0.std, 1.*
    x, y, _ = load_split(tmp_path / "data/prepared/toy", "test", 40)
    with torch.no_grad():
        expected = (rb(x.float() / 255).argmax(1) == y).sum().item() / 40
    result = evaluated("rb.pt")
    assert result["clean_acc"] == expected and result["external"]["normalize"] == "file"
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", "rb.pt", "--arch", "small_cnn", "--normalize", "dataset", "toy"]) == 2
    assert "rb.pt: states its own normalisation (mean 0.3, std 0.4), which is used: leave out --normalize dataset" \
        in capsys.readouterr().err

    five = MODELS["small_cnn"].build(1, 5, width=8, hidden=32)
    torch.save(five.state_dict(), tmp_path / "five.pt")
    assert cli.main(["evaluate", "--model", "five.pt", "--arch", "small_cnn", "toy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: five.pt: its weights do not fit small_cnn: classifier.3.weight is 5x32 in the file, 10x32 "
                   "in small_cnn (5 classes against 10), and 1 more tensors differ in shape"), err

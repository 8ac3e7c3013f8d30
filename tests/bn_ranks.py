"""Run under torchrun by tests/test_processes.py: FGSM-RS with its overfitting guard on a tiny BatchNorm network (a
model registered here only), 2-class images that are hard to tell apart. Every rank writes its per-epoch metrics
and a digest of its parameters to OUT/rankR.json.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/bn_ranks.py OUT"""
import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

from advtrain.config import Params, merge
from advtrain.distributed import World
from advtrain.models import MODELS, ModelSpec
from advtrain.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny_bn(channels: int, classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(64, classes))


def data(n: int = 800):
    """Two classes by brightness, overlapping: held-out accuracy lands between chance and perfect."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.where(y.view(-1, 1, 1, 1) == 1, 132, 124) + torch.randint(-60, 61, (n, 1, 28, 28), generator=g)
    return x.clamp(0, 255).to(torch.uint8), y


def main(out: Path) -> None:
    MODELS["tiny_bn"] = ModelSpec("tiny_bn", tiny_bn)
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                yaml.safe_load((ROOT / "tests/configs/tiny.yaml").read_text()))
    raw = merge(raw, {"methods": {"fgsm": {"fashionmnist": {
        # any drop of the held-out accuracy rolls back: where the ranks measure differently, they decide differently
        "check_points": 200, "check_steps": 3, "drop": 0.001, "on_overfit": "rollback",
        "training": {"epochs": 4, "batch_size": 100, "lr": 0.05, "val_points": 0, "select": "last",
                     "device": "cpu", "precision": "fp32"}}}}})
    cfg = Params(raw).resolve("fgsm", "fashionmnist")
    cfg.model, cfg.model_kwargs, cfg.eps, cfg.alpha = "tiny_bn", {}, 0.02, 0.005
    world = World()
    trainer = Trainer(cfg, *data(), out / "checkpoint.pt", log=lambda m: None, world=world)
    history = trainer.fit()
    params = b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())
    (out / f"rank{world.rank}.json").write_text(json.dumps({
        "history": [{k: h.get(k) for k in ("holdout_pgd_acc", "overfit", "rolled_back_to")} for h in history],
        "params": hashlib.sha256(params).hexdigest()}))
    world.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

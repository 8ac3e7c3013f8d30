"""Size and write time of a training checkpoint at ImageNet's scale: what a mid-epoch checkpoint (preemption.py)
costs a ResNet-50 run. Prints figures; asserts nothing.

    python benchmarks/checkpoint_bench.py [--model resnet50] [--classes 1000] [--ema] [--repeat 3] [--dir DIR]

The state is what Trainer.state_dict holds: the model, SGD's momentum buffers, the best validated epoch's weights
(`select: best`), and with --ema the EMA copy; it is written as the trainer writes it (checkpoint.save_training_state:
a temporary file, fsync, rename)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from advtrain.checkpoint import save_training_state
from advtrain.models import build_model
from advtrain.sources.imagefolder import IMAGENET_MEAN, IMAGENET_STD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    model = build_model(a.model, (3, a.size, a.size), a.classes, IMAGENET_MEAN, IMAGENET_STD)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # one step, so that the momentum buffers exist
        p.grad = torch.zeros_like(p)
    opt.step()
    copy = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    state = {"epoch": 3, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "best": {"epoch": 2, "metric": "val_pgd_acc", "value": 0.3, "state": copy(model)},
             "ema": copy(model) if a.ema else None, "loader_rng": torch.Generator().get_state(),
             "torch_rng": torch.get_rng_state(), "in_epoch": {"batch": 1000}}
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = Path(d) / "ckpt.pt"
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            save_training_state(path, state)
            times.append(time.perf_counter() - t0)
        size = path.stat().st_size
    print(f"{a.model}: {params:,} parameters; checkpoint {size / 1e6:.1f} MB "
          f"(model, momentum, best epoch{', EMA' if a.ema else ''}); write (temporary file, fsync, rename) "
          + ", ".join(f"{t:.2f}" for t in times) + " s")


if __name__ == "__main__":
    main()

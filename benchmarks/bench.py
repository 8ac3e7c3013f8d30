"""Speed benchmark: our Trainer against a seed-style training loop, and against the hardware's limit.

    python benchmarks/bench.py --size small --out bench.json
    python benchmarks/bench.py --size tiny --configs fashionmnist --methods pgd10,free8 --device cpu

Two configurations, on synthetic uint8 data of the real shapes (throughput does not depend on the pixel values):
  cifar10       PreActResNet-18, 3x32x32, 10 classes, random crop (pad 4) + horizontal flip, eps 8/255, alpha 2/255
  fashionmnist  the small CNN (width 16, hidden 128), 1x28x28, 10 classes, no augmentation, eps 0.1, alpha 0.025
Methods, each with its step count pinned (the repo's params.yaml lowers some of them for Fashion-MNIST; not here):
  standard, fgsm (random start, step 1.25 eps, attack in train mode, no overfitting check), pgd10 (K = 10,
  alpha, attack in eval mode), free8 (m = 8 replays), deat1 / deat4 / deat8 (r pinned: schedule `fixed`, r_max = r,
  and the rule's start and count set to r), trades10 (K = 10, beta 6), dynat (K = 10, teacher trained concurrently
  from scratch, as its reference; no held-out check).

OURS is the real `advtrain.trainer.Trainer` built from a validated `config.Params` (precision, channels_last and the
device loader as `auto` picks them), running its own epoch loop (`Trainer.run_epoch`, i.e. `fit` without the
checkpoint writes between epochs). Its figures are the ones the trainer logs: images/s (minibatch images per
second) and forward/backward passes (minibatch equivalents; PGD-K = K + 1 per batch, TRADES-K and DYNAT-K = K + 2,
FREE-m = m, DEAT-r = r, FGSM = 2).

The REFERENCE is the same algorithm written the way the seed repositories (Madry et al.'s, locuslab/fast_adversarial,
Shafahi et al.'s FREE, the TRADES code) write it: fp32, NCHW, a torch.utils.data.DataLoader over a Dataset of uint8
arrays that makes a PIL image per item and applies torchvision transforms (RandomCrop(32, 4) + RandomHorizontalFlip
for CIFAR, then ToTensor), `.to(device)` per batch, `loss.item()` and an accuracy `.item()` per step, plain
torch.optim.SGD (foreach=False), the attack as a plain Python loop over the perturbation. The model is the same
Classifier (normalisation inside, [0, 1] inputs), initialised from the same seed, with the same batch size,
learning rate, momentum and weight decay; the small CNN keeps the seed code's layer order (conv, ReLU, pool: the
same function as ours, and the faster order in NCHW). Fairness, written down:
  * Same K and the same forward/backward passes per batch: the reference counts its passes the way the trainer
    does, the table shows them ("pass/b") and a mismatch is reported as an error (exit status 1).
  * The reference attacks take the INPUT gradient only (torch.autograd.grad, as Madry's code does), not
    `loss.backward()` into every weight as locuslab's attack_pgd does: that would make the reference slower and the
    ratio larger, so we leave that advantage out.
  * TRADES: the reference computes the clean softmax ONCE per batch (no grad), like ours; the original TRADES code
    recomputes model(x_natural) at every inner step (K extra forwards), which we do not charge it for.
  * FREE: the perturbation is a leaf (Shafahi's `noise_batch`), so its gradient passes the [0, 1] clamp exactly as
    our masked input gradient does.
  * DataLoader workers: 0 on the CPU (workers would compete for the same cores), 2 with pinned memory on CUDA.

Measurement: per configuration and method, both loops are built, both run one warm-up epoch (none at --size tiny,
the smoke test), then `--repeats` timed epochs; each round alternates who goes first (ours, ref, then ref, ours, ...)
so that load from other processes hits both alike; the best epoch of each is reported (noise only ever slows a run
down) and every epoch's figure is kept in the JSON. Both loops run in one process: a process-wide setting the
trainer makes (the CPU malloc settings of `trainer.keep_freed_memory`) helps the reference too, which only makes the
ratio conservative.
  * Memory, measured over each loop's first epoch. CUDA: torch.cuda.max_memory_allocated() during the epoch minus memory_allocated() at its start (the
    extra memory the epoch needs beyond what was resident: model, optimizer, our on-device dataset), and the
    absolute peak. CPU: the process's peak RSS during the epoch minus its RSS at the start (Linux VmHWM, reset
    through /proc/self/clear_refs, after malloc_trim(0) so memory freed earlier is not counted as resident).
  * FLOP/s: FlopCounterMode counts, once per model, the FLOPs per image of a forward, of an attack pass (forward and
    backward to the input only) and of a training pass (forward and backward to the weights and the input); a
    method's FLOPs per minibatch image are its mix of those (METHODS: PGD-K = K attack passes + 1 training pass,
    TRADES-K = 1 forward + K attack + 2 training, ...), and achieved FLOP/s = that x images / seconds. The denominator is the device's matrix-multiply
    rate measured in the same run: bf16 on CUDA; on the CPU both fp32 and bf16 are timed and the faster is used
    (CPUs without bf16 units run bf16 matmuls far slower than fp32); the JSON says which.
  * `--autoattack N`: standard AutoAttack (eps 0.1) on N points for the small CNN, PGD-3 trained for a few seconds
    on the real Fashion-MNIST when its offline copy is there (else untrained on synthetic points, where APGD-CE
    fools nearly everything): advtrain.evaluate.autoattack (our per-attack cascade, batch 500) against a plain
    pyautoattack AutoAttack(model, norm="Linf", eps=eps, version="standard").run_standard_evaluation(x, y) with its
    defaults (batch 250).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advtrain.config import Params
from advtrain.io import write_json
from advtrain.methods import METHODS as ADVTRAIN_METHODS
from advtrain.models import model_for
from advtrain.sources import SOURCES
from advtrain.trainer import Trainer, pick_device

CONFIGS = {  # dataset -> (model, augmentation, eps, alpha, DEAT's alpha)
    "cifar10": {"model": "preact_resnet18", "augment": {"crop": 4, "flip": True}, "eps": "8/255", "alpha": "2/255",
                "deat_alpha": "10/255"},
    "fashionmnist": {"model": "small_cnn", "augment": {"crop": 0, "flip": False}, "eps": 0.1, "alpha": 0.025,
                     "deat_alpha": 0.125},
}
# bench name -> (advtrain method, its settings, (forward-only passes, attack passes, training passes) per minibatch).
# An attack pass is a forward and a backward to the input only; a training pass also computes the weight gradients;
# the trainer's "passes" count both (attack + training).
METHODS = {
    "standard": ("standard", {}, (0, 0, 1)),
    "fgsm": ("fgsm", {"step": 1.25, "attack_mode": "train", "check_points": 0}, (0, 1, 1)),
    "pgd10": ("pgd", {"steps": 10, "fraction": 1.0, "attack_mode": "eval"}, (0, 10, 1)),
    "free8": ("free", {"replays": 8}, (0, 0, 8)),
    "deat1": ("deat", {"r_max": 1, "schedule": "fixed", "every": 10 ** 6}, (0, 0, 1)),
    "deat4": ("deat", {"r_max": 4, "schedule": "fixed", "every": 10 ** 6}, (0, 0, 4)),
    "deat8": ("deat", {"r_max": 8, "schedule": "fixed", "every": 10 ** 6}, (0, 0, 8)),
    # TRADES: the clean softmax without grad, K attack steps, then two forwards (x, x_adv) trained together
    "trades10": ("trades", {"steps": 10, "beta": 6.0}, (1, 10, 2)),
    # DYNAT: the teacher's forward/backward, K attack steps, the student's training pass
    "dynat": ("dynat", {"steps": 10, "teacher_epochs": 0, "teacher_update": "concurrent", "check_points": 0},
              (0, 10, 2)),
}
# size -> dataset -> (batch size, batches per epoch, timed epochs per loop, warm-up epochs per loop)
SIZES = {
    # the CI smoke test, seconds on 2 CPU cores: no warm-up, so its figures include first-call costs
    "tiny": {"fashionmnist": (32, 2, 1, 0), "cifar10": (2, 1, 1, 0)},
    "small": {"fashionmnist": (128, 8, 2, 1), "cifar10": (32, 1, 2, 1)},  # minutes on 2 CPU cores
    "full": {"fashionmnist": (128, 50, 3, 1), "cifar10": (128, 20, 3, 1)},  # for a GPU
}
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def log(msg: str) -> None:
    print(msg, flush=True)


# --- configuration -------------------------------------------------------------------------------------------------

def bench_config(method: str, dataset: str, batch_size: int, device: str, epochs: int, precision: str = "auto"):
    """The RunConfig our trainer gets: a validated params dict with the method's settings pinned."""
    ours, settings, _ = METHODS[method]
    c = CONFIGS[dataset]
    settings = dict(settings)
    if ours == "deat":
        settings["alpha"] = c["deat_alpha"]
    raw = {
        "seed": 0,
        "datasets": {dataset: {"source": dataset, "model": c["model"], "eps": c["eps"], "alpha": c["alpha"], "augment": c["augment"]}},
        "models": {"small_cnn": {"width": 16, "hidden": 128, "kernel": 3}},
        "methods": {ours: settings},
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": LR, "momentum": MOMENTUM,
                     "weight_decay": WEIGHT_DECAY, "schedule": "constant", "precision": precision,
                     "channels_last": "auto", "device": device, "train_subset": 0},
    }
    cfg = Params(raw, "<bench>").resolve(ours, dataset)
    if ours == "free":  # FREE-m counts `epochs` in data passes / m: ask for m times as many
        cfg.training["epochs"] = epochs * cfg.method_params["replays"]
    return cfg


def synthetic(dataset: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    source = SOURCES[dataset]
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *source.shape), generator=g, dtype=torch.uint8),
            torch.randint(0, source.num_classes, (n,), generator=g))


# --- the seed-style reference loop ---------------------------------------------------------------------------------

class SeedDataset(torch.utils.data.Dataset):
    """As torchvision's CIFAR10 / FashionMNIST datasets: uint8 HWC arrays, a PIL image per item, then transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).numpy()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        img = self.data[i]
        img = Image.fromarray(img[:, :, 0], mode="L") if img.shape[2] == 1 else Image.fromarray(img)
        return self.transform(img), self.targets[i]


def seed_order(model: torch.nn.Module) -> torch.nn.Module:
    """The small CNN with the seed code's layer order, conv -> ReLU -> pool (ours pools first: the same function and
    parameters). In NCHW the seed order is the faster one (measured), so the reference gets it."""
    from torch import nn

    features = getattr(model.net, "features", None)
    if isinstance(features, nn.Sequential):
        mods = list(features)
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.MaxPool2d) and isinstance(mods[i + 1], nn.ReLU):
                features[i], features[i + 1] = mods[i + 1], mods[i]
    return model


class Reference:
    """One method in the seed repositories' style (see the module docstring); `run_epoch` returns its figures."""

    def __init__(self, cfg, method: str, images: torch.Tensor, labels: torch.Tensor, device: torch.device):
        import torchvision.transforms as T

        self.cfg, self.method, self.device = cfg, method, device
        self.p = cfg.method_params
        self.eps, self.alpha = cfg.eps, self.p.get("alpha") or cfg.alpha
        tr = cfg.training
        aug = []
        if cfg.augment["crop"]:
            aug.append(T.RandomCrop(cfg.info["shape"][1], padding=cfg.augment["crop"]))
        if cfg.augment["flip"]:
            aug.append(T.RandomHorizontalFlip())
        cuda = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(SeedDataset(images, labels, T.Compose(aug + [T.ToTensor()])),
                                                  batch_size=tr["batch_size"], shuffle=True,
                                                  num_workers=2 if cuda else 0, pin_memory=cuda)
        torch.manual_seed(cfg.seed)
        self.model = seed_order(model_for(cfg)).to(device)
        params = list(self.model.parameters())
        self.teacher = None
        if method == "dynat":
            self.teacher = seed_order(model_for(cfg)).to(device)
            params += list(self.teacher.parameters())
        self.opt = torch.optim.SGD(params, lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
                                   foreach=False)
        self.delta = None  # FREE's persistent perturbation
        self.r = METHODS[method][2][2] if METHODS[method][0] == "deat" else None

    def sgd_step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def pgd(self, x, y, steps, alpha, mode_train=False):
        model, eps = self.model, self.eps
        model.train(mode_train)
        delta = torch.zeros_like(x).uniform_(-eps, eps)
        delta = torch.clamp(x + delta, 0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            grad, = torch.autograd.grad(loss, delta)
            delta = torch.clamp(delta.detach() + alpha * torch.sign(grad), -eps, eps)
            delta = torch.clamp(x + delta, 0, 1) - x
        model.train()
        return (x + delta).detach()

    def step(self, x, y) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One minibatch; returns (loss, logits, forward/backward passes in minibatch equivalents)."""
        name, model, eps, p = METHODS[self.method][0], self.model, self.eps, self.p
        if name == "standard":
            out = model(x)
            loss = F.cross_entropy(out, y)
            self.sgd_step(loss)
            return loss, out, 1
        if name == "fgsm":  # Wong et al.: random start, one step of 1.25 eps, crafted in train mode
            x_adv = self.pgd(x, y, 1, p["step"] * eps, mode_train=True)
            out = model(x_adv)
            loss = F.cross_entropy(out, y)
            self.sgd_step(loss)
            return loss, out, 2
        if name == "pgd":  # Madry et al.: K steps from a random start, model in eval mode
            k = p["steps"]
            x_adv = self.pgd(x, y, k, self.alpha)
            out = model(x_adv)
            loss = F.cross_entropy(out, y)
            self.sgd_step(loss)
            return loss, out, k + 1
        if name == "free":  # Shafahi et al.: m replays, one perturbation carried across minibatches
            m = p["replays"]
            if self.delta is None:
                self.delta = torch.zeros_like(x)
            n = len(x)
            for _ in range(m):
                noise = self.delta[:n].clone().requires_grad_(True)
                out = model(torch.clamp(x + noise, 0, 1))
                loss = F.cross_entropy(out, y)
                self.opt.zero_grad()
                loss.backward()
                self.delta[:n] = torch.clamp(self.delta[:n] + eps * torch.sign(noise.grad), -eps, eps)
                self.opt.step()
            return loss, out, m
        if name == "deat":  # Wang et al.: r replays from a fresh random start, step max(eps / r, alpha)
            r, a = self.r, max(eps / self.r, self.alpha)
            delta = torch.zeros_like(x).uniform_(-eps, eps)
            delta = torch.clamp(x + delta, 0, 1) - x
            for i in range(r):
                delta.requires_grad_(True)
                out = model(x + delta)
                loss = F.cross_entropy(out, y)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                if i < r - 1:
                    delta = torch.clamp(delta.detach() + a * torch.sign(delta.grad), -eps, eps)
                    delta = torch.clamp(x + delta, 0, 1) - x
            return loss, out, r
        if name == "trades":  # Zhang et al.: K steps on KL(f(x) || f(x_adv)) in eval mode, then CE + beta KL
            k, beta = p["steps"], p["beta"]
            model.eval()
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
            x_adv = x + 0.001 * torch.randn_like(x)
            for _ in range(k):
                x_adv.requires_grad_(True)
                loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
                grad, = torch.autograd.grad(loss_kl, x_adv)
                x_adv = torch.min(torch.max(x_adv.detach() + self.alpha * torch.sign(grad), x - eps), x + eps)
                x_adv = torch.clamp(x_adv, 0, 1)
            model.train()
            out = model(x)
            out_adv = model(x_adv)
            loss = F.cross_entropy(out, y) + beta * F.kl_div(F.log_softmax(out_adv, dim=1), F.softmax(out, dim=1),
                                                             reduction="batchmean")
            self.sgd_step(loss)
            return loss, out_adv, k + 2
        if name == "dynat":  # Liu et al.: the teacher's argmax as labels, teacher and student in one optimizer
            k = p["steps"]
            self.teacher.train()
            t_out = self.teacher(x)
            labels = t_out.detach().argmax(1)
            model.eval()
            x_adv = torch.clamp(x + 0.001 * torch.randn_like(x), 0, 1)
            for _ in range(k):
                x_adv.requires_grad_(True)
                grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), labels), x_adv)
                x_adv = torch.min(torch.max(x_adv.detach() + self.alpha * torch.sign(grad), x - eps), x + eps)
                x_adv = torch.clamp(x_adv, 0, 1)
            model.train()
            out = model(x_adv)
            loss = F.cross_entropy(out, labels) + F.cross_entropy(t_out, y)
            self.sgd_step(loss)
            return loss, out, k + 2
        raise ValueError(name)

    def run_epoch(self) -> dict:
        dev = self.device
        self.model.train()
        total_loss = correct = n = passes = 0.0
        t0 = time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(dev), y.to(dev)
            loss, out, k = self.step(x, y)
            total_loss += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
            passes += k * len(y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        b = self.cfg.training["batch_size"]
        return {"seconds": seconds, "images": n, "passes": passes / b, "batch_size": b, "loss": total_loss / n}


# --- ours ------------------------------------------------------------------------------------------------------------

class Ours:
    def __init__(self, cfg, method: str, images, labels, ckpt: Path, compile: bool = False):
        teacher = model_for(cfg) if ADVTRAIN_METHODS[cfg.method].needs_teacher else None
        self.trainer = Trainer(cfg, images, labels, ckpt, log=lambda m: None, teacher=teacher)
        if compile:  # the trainer has no compile setting (it lost on the CPU, see docs/benchmarks.md): try it here
            self.trainer.model = torch.compile(self.trainer.model)
        if cfg.method == "deat":  # pin r: the rule starts at r and its fixed staircase never moves
            rule = self.trainer.method.rule
            rule.start = rule.count = METHODS[method][2][2]

    def run_epoch(self) -> dict:
        m = self.trainer.run_epoch()
        self.trainer.epoch += 1
        return {"seconds": m["seconds"], "images": round(m["images_per_s"] * m["seconds"]), "passes": m["passes"],
                "batch_size": self.trainer.tr["batch_size"], "loss": m["loss"]}


# --- measuring -----------------------------------------------------------------------------------------------------

class Memory:
    """Peak extra memory of a block (see the module docstring for what it means on each device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            with contextlib.suppress(OSError):
                self.libc = ctypes.CDLL("libc.so.6")
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "cpu peak RSS delta (VmHWM reset via /proc/self/clear_refs, after malloc_trim)"
            except OSError:
                self.kind = None
        else:
            self.kind = "cuda max_memory_allocated delta"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    @contextlib.contextmanager
    def measure(self, out: dict):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - start) / 2 ** 20
            out["peak_mem_abs_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        elif self.kind:
            gc.collect()
            if self.libc is not None:
                self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            start = self._status("VmRSS")
            yield
            out["peak_mem_mb"] = max(0, self._status("VmHWM") - start) / 2 ** 20
        else:
            yield
            out["peak_mem_mb"] = None


def model_flops(cfg, device: torch.device) -> dict:
    """FLOPs per image of one forward, one attack pass (forward + backward to the input) and one training pass
    (forward + backward to the weights and the input), counted by FlopCounterMode on the configuration's model."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model_for(cfg).to(device).train()
    b = 4
    x = torch.rand(b, *cfg.info["shape"], device=device)
    y = torch.zeros(b, dtype=torch.long, device=device)
    out = {}
    for kind in ("forward", "attack", "train"):
        counter = FlopCounterMode(display=False)
        xi = x.clone().requires_grad_(kind != "forward")
        model.requires_grad_(kind == "train")  # an attack's autograd.grad computes no weight gradient either
        with counter, torch.set_grad_enabled(kind != "forward"):
            loss = F.cross_entropy(model(xi), y)
            if kind != "forward":
                loss.backward()
        out[kind] = counter.get_total_flops() / b
    return out


def method_flops(method: str, flops: dict) -> float:
    """FLOPs per minibatch image of a method: its forward-only, attack and training passes (METHODS)."""
    fwd, attack, train = METHODS[method][2]
    return fwd * flops["forward"] + attack * flops["attack"] + train * flops["train"]


def matmul_rate(dtype: torch.dtype, device: torch.device, budget_s: float = 0.4) -> dict:
    """The best FLOP/s of an n x n matmul in `dtype`, n grown until one product takes >= 20 ms (or n = 8192)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t
        if dt >= 0.02 or n >= 8192:
            break
        n *= 2
    reps = max(1, min(50, int(budget_s / 3 / max(dt, 1e-6))))
    best = math.inf
    for _ in range(3):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return {"n": n, "flops": 2 * n ** 3 / best}


def device_peak(device: torch.device) -> dict:
    rates = {"bf16": matmul_rate(torch.bfloat16, device)}
    if device.type == "cpu":
        rates["fp32"] = matmul_rate(torch.float32, device)
        use = max(rates, key=lambda k: rates[k]["flops"])
    else:
        use = "bf16"
    return {"matmul": rates, "denominator": use, "peak_flops": rates[use]["flops"]}


def figures(run: dict, flops_img: float, peak: float) -> dict:
    s = run["seconds"]
    flops = flops_img * run["images"] / s
    return {"images_per_s": run["images"] / s, "passes_per_s": run["passes"] / s,
            "passes_per_batch": run["passes"] * run["batch_size"] / run["images"], "seconds": s,
            "flops_per_s": flops, "fraction_of_peak": flops / peak}


def bench_one(dataset: str, method: str, size: str, device: torch.device, repeats: int | None, tmp: Path,
              flops_img: float, peak: float, compile: bool = False, precision: str = "auto") -> dict:
    batch_size, batches, timed, warm = SIZES[size][dataset]
    timed = repeats or timed
    cfg = bench_config(method, dataset, batch_size, device.type, warm + timed, precision)
    images, labels = synthetic(dataset, batch_size * batches, seed=1)
    loops = {"ours": Ours(cfg, method, images, labels, tmp / f"{dataset}_{method}.pt", compile),
             "reference": Reference(cfg, method, images, labels, device)}
    mem = Memory(device)
    samples: dict = {k: [] for k in loops}
    memory: dict = {}
    # memory is measured on each loop's first epoch (the warm-up, when there is one): it allocates everything the
    # epoch needs, and the timed epochs stay free of the measurement's malloc_trim
    for e in range(warm + timed):
        order = ("ours", "reference") if e % 2 == 0 else ("reference", "ours")
        for name in order:
            out: dict = {}
            with mem.measure(out) if e == 0 else contextlib.nullcontext():
                run = loops[name].run_epoch()
            if e == 0:
                memory[name] = out
            if e >= warm:
                samples[name].append(figures(run, flops_img, peak))
    result: dict = {"batch_size": batch_size, "batches_per_epoch": batches, "timed_epochs": timed,
                    "warmup_epochs": warm, "memory_kind": mem.kind}
    for name, runs in samples.items():
        best = max(runs, key=lambda r: r["images_per_s"])
        result[name] = {**best, **memory[name], "epochs_images_per_s": [r["images_per_s"] for r in runs]}
    o, r = result["ours"], result["reference"]
    result["ratio"] = o["images_per_s"] / r["images_per_s"]
    if abs(o["passes_per_batch"] - r["passes_per_batch"]) > 1e-6:
        result["error"] = f"passes differ: ours {o['passes_per_batch']:g}, reference {r['passes_per_batch']:g}"
    del loops
    gc.collect()
    return result


# --- AutoAttack ------------------------------------------------------------------------------------------------------

def autoattack_model(n: int, device: torch.device, tmp: Path):
    """The small CNN and n test points for the AutoAttack timing: PGD-3 trained for 6,400 images on the real
    Fashion-MNIST when its offline copy is present (robust accuracy mid-range, so every attack of the cascade has
    points left to work on); otherwise untrained, on synthetic points labelled with its own predictions."""
    from advtrain.attacks import pgd
    from advtrain.prepared import load_split, prepare
    from advtrain.sources.fashionmnist import FILES, system_dir

    cfg = bench_config("standard", "fashionmnist", 128, device.type, 1)
    torch.manual_seed(0)
    model = model_for(cfg).to(device)
    system = system_dir()
    if all((system / f"{name}.gz").exists() or (system / name).exists() for name in FILES):
        prepare(SOURCES["fashionmnist"](), tmp / "fashionmnist", tmp / "raw")
        xs, ys, _ = load_split(tmp / "fashionmnist", "train")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for i in range(0, 6400, 128):
            x, y = xs[i:i + 128].to(device).float() / 255, ys[i:i + 128].to(device)
            x_adv = pgd(model.eval(), x, y, cfg.eps, cfg.eps / 4, 3)
            loss = F.cross_entropy(model.train()(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        xt, yt, _ = load_split(tmp / "fashionmnist", "test")
        return cfg, model.eval(), xt[:n].to(device).float() / 255, yt[:n].to(device), \
            "small_cnn, PGD-3 trained on 6,400 Fashion-MNIST images; Fashion-MNIST test points"
    model.eval()
    x = synthetic("fashionmnist", n, seed=2)[0].to(device).float().div(255)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correctly classified
    return cfg, model, x, y, "small_cnn, untrained; synthetic points labelled with its own predictions"


def bench_autoattack(n: int, device: torch.device, tmp: Path) -> dict:
    import logging

    import pyautoattack

    from advtrain.evaluate import evaluate

    cfg, model, x, y, what = autoattack_model(n, device, tmp)
    out = {"n_points": n, "eps": cfg.eps, "model": what}
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    ev = {"batch_size": 500, "pgd_steps": 0, "cw_steps": 0, "pgd_restarts": 1, "pgd_alpha": None,
          "autoattack": "standard"}  # AutoAttack only, as `advtrain evaluate` runs it (without a state file)
    ours = evaluate(model, x, y, cfg.eps, ev, 0, device, log=lambda m: None)["autoattack"]
    out["ours"] = {"seconds": time.perf_counter() - t0, "robust_acc": ours["robust_acc"], "batch_size": 500,
                   "robust_acc_after": ours["robust_acc_after"], "seconds_per_attack": ours["seconds_per_attack"]}
    adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=cfg.eps, version="standard", device=device)
    adversary.logger.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    x_adv = adversary.run_standard_evaluation(x, y)
    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x_adv.to(device)).argmax(1) == y).float().mean().item()
    out["plain_pyautoattack"] = {"seconds": seconds, "robust_acc": acc, "batch_size": 250}
    out["ratio_seconds_ours_over_plain"] = out["ours"]["seconds"] / seconds
    return out


# --- the command -----------------------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    return info


def table(results: dict, peak: dict) -> str:
    head = (f"{'config':<13} {'method':<9} {'pass/b':>6} {'ours img/s':>11} {'ref img/s':>10} {'ratio':>6} "
            f"{'ours pass/s':>11} {'ref pass/s':>10} {'ours MB':>8} {'ref MB':>7} {'ours %pk':>8} {'ref %pk':>7}")
    lines = [f"peak = {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['denominator']} matmul)", head, "-" * len(head)]
    mb = lambda v: "   -" if v is None else f"{v:.0f}"  # noqa: E731
    for dataset, methods in results.items():
        for method, r in methods.items():
            o, f = r["ours"], r["reference"]
            lines.append(f"{dataset:<13} {method:<9} {o['passes_per_batch']:>6g} {o['images_per_s']:>11.1f} "
                         f"{f['images_per_s']:>10.1f} {r['ratio']:>6.2f} {o['passes_per_s']:>11.2f} "
                         f"{f['passes_per_s']:>10.2f} {mb(o['peak_mem_mb']):>8} {mb(f['peak_mem_mb']):>7} "
                         f"{100 * o['fraction_of_peak']:>7.1f}% {100 * f['fraction_of_peak']:>6.1f}%"
                         + (f"  ERROR {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs per loop (default: by --size)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile our trainer's model (the warm-up epoch then includes the compilation)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="our trainer's training.precision (default: auto, as params.yaml; the reference is fp32)")
    ap.add_argument("--autoattack", type=int, default=0, metavar="N", help="also time AutoAttack on N points")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    bad = [c for c in configs if c not in CONFIGS] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine(device)
    log(f"[bench] {info}")
    peak = device_peak(device)
    log("[bench] matmul: " + ", ".join(f"{k} {v['flops'] / 1e9:.1f} GFLOP/s (n={v['n']})"
                                       for k, v in peak["matmul"].items()) + f"; denominator {peak['denominator']}")
    results: dict = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="advtrain-bench-") as tmp:
        for dataset in configs:
            cfg = bench_config("standard", dataset, 8, device.type, 1)
            flops = model_flops(cfg, device)
            results[dataset] = {}
            for method in methods:
                t0 = time.perf_counter()
                flops_img = method_flops(method, flops)
                r = bench_one(dataset, method, args.size, device, args.repeats, Path(tmp), flops_img, peak["peak_flops"],
                              args.compile, args.precision)
                r["model_flops_per_image"] = flops
                r["flops_per_minibatch_image"] = flops_img
                results[dataset][method] = r
                log(f"[bench] {dataset} {method}: ours {r['ours']['images_per_s']:.1f} img/s, reference "
                    f"{r['reference']['images_per_s']:.1f} img/s, ratio {r['ratio']:.2f} ({time.perf_counter() - t0:.1f}s)"
                    + (f"  ERROR {r['error']}" if "error" in r else ""))
        out = {"size": args.size, "compile": args.compile, "precision": args.precision, "machine": info, "peak": peak,
               "results": results}
        if args.autoattack:
            aa = bench_autoattack(args.autoattack, device, Path(tmp))
            out["autoattack"] = aa
            log(f"[bench] AutoAttack (standard) on {aa['n_points']} points ({aa['model']}): ours "
                f"{aa['ours']['seconds']:.1f}s (robust {100 * aa['ours']['robust_acc']:.1f}%), plain pyautoattack "
                f"{aa['plain_pyautoattack']['seconds']:.1f}s (robust {100 * aa['plain_pyautoattack']['robust_acc']:.1f}%)")
    out["seconds"] = time.perf_counter() - t_all
    with contextlib.suppress(OSError):
        out["machine"]["loadavg_at_end"] = os.getloadavg()
    print(table(results, peak), flush=True)
    if args.out:
        write_json(args.out, out)
        log(f"[bench] wrote {args.out}")
    return 1 if any("error" in r for m in results.values() for r in m.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

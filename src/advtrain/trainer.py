"""The epoch loop every method shares: data on the device, learning-rate schedule, precision, checkpoint/resume,
per-epoch metrics. It does not import mlflow: tracking comes in through `callbacks` (see tracking.py)."""
from __future__ import annotations

import contextlib
import ctypes
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import checkpoint, faults
from .config import RunConfig
from .loader import DeviceLoader
from .errors import UserError
from .methods import METHODS
from .models import model_for


class Callbacks(Protocol):
    def on_start(self, trainer: "Trainer", resumed: bool) -> None: ...
    def on_epoch(self, trainer: "Trainer", metrics: dict) -> None: ...


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("device is 'cuda' in params.yaml but no CUDA GPU is visible: set it to 'auto' or 'cpu'")
    return torch.device("cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def keep_freed_memory() -> None:
    """On glibc, keep freed memory in the process. Training frees and re-allocates the same activation sizes every
    pass, and glibc's defaults (mmap for large blocks, trimming the heap top) hand them back to the kernel each time:
    ~2,000 page faults per forward/backward of the small CNN at batch 128, a quarter of its CPU time (measured with
    `python -m advtrain.bench`). Process-wide; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-ed blocks
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never trim the heap top
    except (OSError, AttributeError):
        pass


def lr_at(progress: float, tr: dict) -> float:
    """The learning rate at a point of training, progress in [0, 1] (fraction of the data passes done).

    Stepped per optimizer step: methods that replay a minibatch advance progress inside the batch."""
    lr = tr["lr"]
    if tr["schedule"] == "piecewise":
        return lr * tr["lr_decay"] ** sum(progress >= m for m in tr["milestones"])
    if tr["schedule"] == "cyclic":  # 0 -> lr at cyclic_peak -> 0 (Wong et al.'s fast AT)
        peak = tr["cyclic_peak"]
        return lr * (progress / peak if progress < peak else max(0.0, (1 - progress) / (1 - peak)))
    return lr


class Trainer:
    def __init__(self, cfg: RunConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
                 checkpoint_path: str | Path, callbacks: list[Callbacks] = (), log: Callable[[str], None] = print,
                 teacher: torch.nn.Module | None = None):
        self.cfg, self.tr = cfg, cfg.training
        self.log = log
        self.callbacks = list(callbacks)
        self.checkpoint_path = Path(checkpoint_path)
        self.device = pick_device(self.tr["device"])
        cuda = self.device.type == "cuda"
        if not cuda:
            keep_freed_memory()
        self.use_bf16 = self.tr["precision"] == "bf16" or (self.tr["precision"] == "auto" and cuda)
        # channels_last pays on CUDA, and on CPU for these conv nets: on 2 CPU cores small_cnn's eval forward is 2.7x
        # faster (max-pooling is the slow NCHW kernel) and a plain forward+backward 1.4x; PGD-AT training measured
        # the same (~575 img/s) either way. So "auto" means on.
        self.channels_last = self.tr["channels_last"] in (True, "auto")

        torch.manual_seed(cfg.seed)
        self.method = METHODS[cfg.method](cfg)
        self.epochs = self.method.data_passes(self.tr["epochs"])  # FREE-m makes m replays per pass: epochs / m
        if self.method.needs_teacher and teacher is None:
            raise UserError(f"{cfg.method} needs its teacher: run `advtrain pretrain {cfg.method} {cfg.dataset}` first")
        if self.tr["train_subset"]:
            train_images, train_labels = train_images[: self.tr["train_subset"]], train_labels[: self.tr["train_subset"]]
        self.holdout = None  # images kept out of training for a per-epoch check (FGSM's overfitting guard)
        if self.method.holdout:
            n = self.method.holdout
            self.holdout = (train_images[-n:].to(self.device).float().div(255), train_labels[-n:].to(self.device))
            train_images, train_labels = train_images[:-n], train_labels[:-n]
        if len(train_labels) == 0:  # params.yaml refuses this for sources of known size; here for the others
            raise UserError(f"{cfg.name}: no training image left after the {self.method.holdout} held out by "
                            f"methods.{cfg.method}.{self.method.held_out_key}: lower it or keep more training images")
        self.loader = DeviceLoader(train_images, train_labels, self.tr["batch_size"], self.device, shuffle=True,
                                   crop=cfg.augment["crop"], flip=cfg.augment["flip"], seed=cfg.seed,
                                   channels_last=self.channels_last)
        self.model = model_for(cfg)
        self.model.to(self.device).use_channels_last(self.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.tr["lr"], momentum=self.tr["momentum"],
                                         weight_decay=self.tr["weight_decay"], foreach=True)
        self.method.setup(self)
        if self.method.needs_teacher:
            self.method.attach_teacher(self, teacher)
        self.epoch = 0  # epochs completed
        self.stop_reason: str | None = None  # set by an end-of-epoch check; training ends after that epoch
        self.history: list[dict] = []
        self.run_id: str | None = None  # the MLflow run (None while the store is unreachable)
        # finds that run again (tracking.py): one MLflow run per distinct training configuration; kept in the
        # checkpoint and the model file, so the same settings give byte-identical files
        self.run_key = cfg.train_fingerprint()
        self._batch = 0  # global minibatch index, for the schedule

    # --- what methods call ------------------------------------------------------------------------------------

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def attack_mode(self, mode: str = "eval"):
        """Craft attacks with BN in eval mode (statistics untouched by attack passes), or in train mode."""
        self.model.train(mode == "train")
        try:
            yield
        finally:
            self.model.train(True)

    def count_passes(self, steps: int, n_images: int) -> None:
        """Work besides `update`'s own pass (attacks, a second network): `steps` forward+backward passes over
        `n_images` images."""
        self._image_passes += steps * n_images

    def update(self, inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
               within_batch: float = 1.0, measure: bool | slice = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward + backward + optimizer step on `inputs` (model in train mode). The backward also yields the
        input gradient; with `measure` (True, or a slice of the batch: its adversarial part) its L1 norm is added to
        the epoch's gradient magnitude (no extra pass). `within_batch` in (0, 1] is the share of the minibatch's
        optimizer steps done after this one (replays), for the learning-rate schedule.
        Returns (logits, loss); the input gradient is left in `self.input_grad`."""
        inputs = inputs.detach().requires_grad_(True)
        with self.autocast():
            logits = self.model(inputs)
        loss = loss_fn(logits.float())
        if faults.fires("train.nan"):
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.input_grad = inputs.grad
        if measure is not False:
            grad = inputs.grad if measure is True else inputs.grad[measure]
            self._acc["grad_l1"] += grad.detach().abs().sum(dtype=torch.float32)
        # the first non-finite loss of the epoch, remembered on the device (no host synchronisation per step)
        a = self._acc
        a["step"] += 1
        finite = torch.isfinite(loss.detach())
        a["first_bad"] = torch.where(a["finite"] & ~finite, a["step"], a["first_bad"])
        a["finite"] &= finite
        self._image_passes += len(inputs)
        progress = (self._batch + within_batch) / (self.epochs * len(self.loader))
        lr = lr_at(progress, self.tr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self._steps += 1
        return logits, loss

    def record(self, loss: torch.Tensor, clean=None, adv=None, n: int | None = None) -> None:
        """Accumulate a minibatch's loss (a mean over its `n` examples; default: the clean plus the adversarial ones)
        and its clean/adversarial accuracies, on the device (no host synchronisation)."""
        a = self._acc
        if n is None:
            n = sum(len(p[1]) for p in (clean, adv) if p is not None)
        a["loss"] += loss.detach().float() * n
        a["n"] += n
        for key, part in (("clean", clean), ("adv", adv)):
            if part is not None and len(part[1]):
                logits, y = part
                a[f"{key}_correct"] += (logits.detach().argmax(1) == y).sum()
                a[f"{key}_n"] += len(y)

    # --- the loop -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "fingerprint": self.cfg.train_fingerprint(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "loader_rng": self.loader.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "history": self.history,
            "run_key": self.run_key,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.method.load_state_dict(s["method"])
        self.loader.generator.set_state(s["loader_rng"])
        torch.set_rng_state(s["torch_rng"])
        if s.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"])
        self.epoch, self.history, self.stop_reason = s["epoch"], s["history"], s["stop_reason"]
        self.run_key = s.get("run_key") or self.run_key  # checkpoints before the key existed keep a new one

    def try_resume(self) -> bool:
        """Continue from the last completed epoch if a checkpoint of this exact configuration exists."""
        state = checkpoint.load_training_state(self.checkpoint_path)
        if state is None:
            others = [p.name for p in self.checkpoint_path.parent.glob("*.pt") if p != self.checkpoint_path]
            kept = f" ({len(others)} of other settings kept in {self.checkpoint_path.parent}/)" if others else ""
            self.log(f"[{self.cfg.name}] no checkpoint of these settings; starting afresh{kept}")
            return False
        if state.get("fingerprint") != self.cfg.train_fingerprint():
            self.log(f"[{self.cfg.name}] {self.checkpoint_path} is from other settings; starting afresh")
            return False
        self.load_state_dict(state)
        done = " (finished: publishing it)" if self.epoch >= self.epochs or self.stop_reason else ""
        self.log(f"[{self.cfg.name}] resuming after epoch {self.epoch}/{self.epochs} from {self.checkpoint_path}{done}")
        return True

    def fit(self, resume: bool = True) -> list[dict]:
        resumed = resume and self.try_resume()
        for cb in self.callbacks:
            cb.on_start(self, resumed)
        if not resumed:  # epoch 0: a run killed in its first epoch restarts into the same MLflow run
            checkpoint.save_training_state(self.checkpoint_path, self.state_dict())
        epochs = self.epochs
        self.log(f"[{self.cfg.name}] {self.cfg.model} on {self.device}, bf16={self.use_bf16}, "
                 f"channels_last={self.channels_last}, {len(self.loader.labels)} images, {len(self.loader)} batches/epoch")
        while self.epoch < epochs and self.stop_reason is None:
            metrics = self.run_epoch()
            self.epoch += 1
            self.history.append(metrics)
            if self.stop_reason:
                self.log(f"[{self.cfg.name}] stopping after epoch {self.epoch}: {self.stop_reason}")
            checkpoint.save_training_state(self.checkpoint_path, self.state_dict())
            faults.fires("train.epoch_end")
            for cb in self.callbacks:
                cb.on_epoch(self, metrics)
        return self.history

    # --- what end-of-epoch checks call (FGSM's catastrophic-overfitting guard) ----------------------------------

    def snapshot(self) -> dict:
        """A copy of the model and optimizer state (on the CPU), to roll back to."""
        def cpu(obj):
            if isinstance(obj, torch.Tensor):
                return obj.detach().to("cpu", copy=True)
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [cpu(v) for v in obj]
            return obj

        return {"model": cpu(self.model.state_dict()), "optimizer": cpu(self.optimizer.state_dict())}

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def begin_epoch(self) -> None:
        """Zero the epoch's accumulators (device tensors, read once at the end of the epoch)."""
        dev = self.device
        zeros = lambda dtype=torch.float32: torch.zeros((), device=dev, dtype=dtype)  # noqa: E731
        self._acc = {"loss": zeros(), "n": 0, "grad_l1": zeros(), "finite": torch.ones((), dtype=torch.bool, device=dev),
                     "step": zeros(torch.long), "first_bad": zeros(torch.long),
                     "clean_correct": zeros(torch.long), "clean_n": 0, "adv_correct": zeros(torch.long), "adv_n": 0}
        self._image_passes = self._steps = 0
        self.model.train()
        self.method.begin_epoch()

    def run_epoch(self) -> dict:
        """One epoch (the next one, `self.epoch`) without checkpointing or callbacks; returns its metrics. `fit`
        calls it; the benchmark (benchmarks/bench.py) times it."""
        epoch = self.epoch
        dev = self.device
        self.begin_epoch()
        steps_in_use = self.method.attack_steps()
        n_batches = len(self.loader)
        report_every = max(1, n_batches // 4)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            self._batch = epoch * n_batches + i
            faults.fires("train.batch")
            self.method.step(self, x, y)
            if (i + 1) % report_every == 0 and i + 1 < n_batches:
                rate = (i + 1) * self.tr["batch_size"] / (time.perf_counter() - t0)
                self.log(f"[{self.cfg.name}] epoch {epoch + 1}/{self.epochs}  batch {i + 1}/{n_batches}  "
                         f"{rate:.0f} img/s")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        a = self._acc
        if not bool(a["finite"]):
            kept = (f"the last good checkpoint (epoch {self.epoch}) is kept at {self.checkpoint_path}"
                    if self.epoch else f"no epoch of these settings had completed (the checkpoints of other "
                                       f"settings in {self.checkpoint_path.parent}/ are untouched)")
            raise UserError(f"{self.cfg.name}: the loss became NaN/inf at epoch {epoch + 1}, optimizer step "
                            f"{int(a['first_bad'])}/{self._steps} of that epoch; {kept}: lower training.lr (or check "
                            "the data) and rerun")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": a["loss"].item() / max(1, a["n"]),
            "clean_acc": a["clean_correct"].item() / a["clean_n"] if a["clean_n"] else None,
            "adv_acc": a["adv_correct"].item() / a["adv_n"] if a["adv_n"] else None,
            "grad_l1": a["grad_l1"].item(),
            "attack_steps": steps_in_use,
            # forward+backward work in minibatch equivalents: PGD-K costs K + 1 per batch, TRADES-K costs K + 2
            "passes": round(self._image_passes / self.tr["batch_size"], 3),
            "optimizer_steps": self._steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": a["n"] / seconds if seconds > 0 else math.nan,
        }
        metrics.update(self.method.end_epoch(self, epoch, metrics))
        pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
        self.log(f"[{self.cfg.name}] epoch {epoch + 1}/{self.epochs}  loss {metrics['loss']:.4f}  "
                 f"clean {pct(metrics['clean_acc'])}  adv {pct(metrics['adv_acc'])}  |grad|_1 {metrics['grad_l1']:.4g}  "
                 f"steps {steps_in_use}  passes {metrics['passes']:g}  {seconds:.1f}s")
        return metrics

"""The epoch loop every method shares: data on the device, learning-rate schedule, precision, checkpoint/resume,
per-epoch metrics. It does not import mlflow: tracking comes in through `callbacks` (see tracking.py)."""
from __future__ import annotations

import contextlib
import ctypes
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from . import checkpoint, faults
from .attacks import predict, worst_case
from .config import RunConfig
from .distributed import World
from .errors import UserError
from .lazy import torch
from .loader import InMemory
from .methods import METHODS
from .models import model_for
from .preemption import Checkpoints, Preempted


class Callbacks(Protocol):
    def on_start(self, trainer: "Trainer", resumed: bool) -> None: ...
    def on_epoch(self, trainer: "Trainer", metrics: dict) -> None: ...


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("device is 'cuda' in params.yaml but no CUDA GPU is visible: set it to 'auto' or 'cpu'")
    return torch.device("cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, as Linux lists them in /proc/cpuinfo).
    Where it does, bf16 autocast trains PGD-10 on the small CNN 1.7-1.8x faster than fp32 (docs/benchmarks.md);
    where it does not (AVX2 only: bf16 matmul ran at 1.4 GFLOP/s against 88 in fp32), `auto` stays fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


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
    def __init__(self, cfg: RunConfig, data, train_labels: torch.Tensor | None,
                 checkpoint_path: str | Path, callbacks: list[Callbacks] = (), log: Callable[[str], None] = print,
                 teacher: torch.nn.Module | None = None, world: World | None = None):
        """`data`: the training split, as loader.InMemory / stream.ShardedData (labels None), or uint8 images with
        their `train_labels`."""
        self.cfg, self.tr = cfg, cfg.training
        self.log = log
        self.callbacks = list(callbacks)
        self.checkpoint_path = Path(checkpoint_path)
        # data parallelism (distributed.py): under torchrun every rank trains its shard of each global batch
        self.world = world or World()
        self.device = self.world.device(pick_device(self.tr["device"]))
        self.world.start(self.device)
        cuda = self.device.type == "cuda"
        if not cuda:
            keep_freed_memory()
        # auto: bf16 autocast where the device multiplies bf16 natively (CUDA; CPUs with AVX512-BF16/AMX)
        self.use_bf16 = self.tr["precision"] == "bf16" or (self.tr["precision"] == "auto" and (cuda or cpu_has_bf16()))
        # channels_last pays on CUDA, and on CPU for these conv nets: on 2 CPU cores small_cnn's eval forward is 2.7x
        # faster (max-pooling is the slow NCHW kernel) and a plain forward+backward 1.4x; PGD-AT training measured
        # the same (~575 img/s) either way. So "auto" means on.
        self.channels_last = self.tr["channels_last"] in (True, "auto")

        torch.manual_seed(cfg.seed)
        self.method = METHODS[cfg.method](cfg)
        self.epochs = self.method.data_passes(self.tr["epochs"])  # FREE-m makes m replays per pass: epochs / m
        if self.method.needs_teacher and teacher is None:
            raise UserError(f"{cfg.method} needs its teacher: run `advtrain pretrain {cfg.method} {cfg.dataset}` first")
        if train_labels is not None:
            data = InMemory(data, train_labels)
        if self.tr["train_subset"]:
            data = data.head(self.tr["train_subset"])
        # Images kept out of training, from the end of the training set: a method's own per-epoch check (FGSM's
        # overfitting guard) and the validation split that model selection uses. Never the test split. Kept as
        # uint8 on the device, made float a batch at a time (attacks.as_float). Only the main rank validates, so
        # only it reads the validation images; every rank reads the method's own (its check decides on every rank).
        wanted = max(self.method.holdout, self.tr["val_points"])
        held = {"holdout": self.method.holdout, "val": self.tr["val_points"] if self.world.main else 0}
        self.holdout = self.val = None
        n_held, n_read = min(wanted, len(data)), min(max(held.values()), len(data))
        if n_read:
            images, labels = data.tensors(len(data) - n_read, len(data))
            for key, n in held.items():
                if n:
                    setattr(self, key, (images[-n:].to(self.device), labels[-n:].to(self.device)))
        if n_held:
            data = data.head(len(data) - n_held)
        if len(data) == 0:  # params.yaml refuses this for sources of known size; here for the others
            raise UserError(f"{cfg.name}: no training image left after the {wanted} held out (methods."
                            f"{cfg.method}.{self.method.held_out_key}, training.val_points): keep more training images")
        last = len(data) % self.tr["batch_size"]
        if self.world.on and 0 < last < self.world.size:
            raise UserError(f"{cfg.name}: the last minibatch holds {last} images, fewer than the {self.world.size} "
                            "ranks: change training.batch_size or training.train_subset")
        self.n_train = len(data)
        self.loader = data.loader(self.tr["batch_size"], self.device, cfg.augment, cfg.seed, self.channels_last,
                                  self.world.shard if self.world.on else None)
        self.model = model_for(cfg)
        self.model.to(self.device).use_channels_last(self.channels_last)
        # Under torchrun, `update`'s pass goes through DDP (one gradient all-reduce per optimizer step, overlapped
        # with the backward); attacks use the unwrapped `self.model`, so their passes all-reduce nothing.
        self.ddp = None
        if self.world.on:
            if self.tr["sync_bn"] and cuda:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.tr["lr"], momentum=self.tr["momentum"],
                                         weight_decay=self.tr["weight_decay"], foreach=True)
        # an exponential moving average of the weights (and buffers), updated after every optimizer step; when on,
        # it is what validation measures and what the model file holds
        swa = torch.optim.swa_utils
        self.ema = (swa.AveragedModel(self.model, multi_avg_fn=swa.get_ema_multi_avg_fn(self.tr["ema_decay"]),
                                      use_buffers=True) if self.tr["ema_decay"] else None)
        self.best: dict | None = None  # the best epoch so far by validation: {"epoch", "metric", "value", "state"}
        self.restored_epoch: int | None = None  # set by `restore` within an epoch: the epoch the weights are from
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
        # checkpoints inside an epoch, on a timer and at SIGTERM/SIGUSR1 (preemption.py); `_resume_at` is where a
        # checkpoint written inside an epoch left it
        self.checkpoints = Checkpoints(self.tr["checkpoint_minutes"], self.world)
        self._in_epoch: dict | None = None
        self._resume_at: dict | None = None
        self._global_n, self._shard, self._loss_scale = 0, slice(None), 1.0  # this rank's part of the minibatch

    # --- what methods call ------------------------------------------------------------------------------------

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like the minibatch `x`, for an attack's random start."""
        return self._draw(x, torch.rand_like)

    def normal_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like the minibatch `x` (the 0.001 N(0, 1) start of TRADES-style attacks)."""
        return self._draw(x, torch.randn_like)

    def _draw(self, x: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Under torchrun, a rank's whole shard gets its slice of noise drawn for the whole global batch (in the
        same memory order): each rank draws what one process draws, and the ranks' generators stay in step. A part
        of a shard (PGD's `fraction` < 1) draws its own."""
        if not self.world.on or len(x) != self._shard.stop - self._shard.start:
            return fill(x)
        fmt = torch.channels_last if x.dim() == 4 and self.channels_last else torch.contiguous_format
        whole = torch.empty((self._global_n, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        return fill(whole)[self._shard]

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
            logits = (self.ddp if self.ddp is not None else self.model)(inputs)
        loss = loss_fn(logits.float())
        if faults.fires("train.nan"):
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        if self.world.on:
            # DDP averages the ranks' gradients; each rank's mean loss is weighted by its share of the global batch,
            # so the average is the gradient of the global batch's mean loss (distributed.py)
            (loss * self._loss_scale).backward()
            self.world.average_gradients(self._unwrapped_params())
            self.input_grad = inputs.grad / self.world.size  # the weighting multiplied it by the world's size
        else:
            loss.backward()
            self.input_grad = inputs.grad
        if measure is not False:
            grad = self.input_grad if measure is True else self.input_grad[measure]
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
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self._steps += 1
        return logits, loss

    def _unwrapped_params(self) -> list[torch.nn.Parameter]:
        """Parameters in the optimizer that DDP does not own (a teacher trained alongside the student)."""
        return [p for group in self.optimizer.param_groups[1:] for p in group["params"]]

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
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best": self.best,
            "in_epoch": self._in_epoch,
            "rank_buffers": self._rank_buffers(),
        }

    def _rank_buffers(self) -> dict | None:
        """Under torchrun, every rank's buffers (BatchNorm's running statistics), rank by rank. DDP hands rank 0's to
        every rank at each training forward, but each rank then updates its own from its shard, and the attacks made
        in eval mode between two forwards use them: a resumed run needs each rank's own. None in one process."""
        if not self.world.on:
            return None
        return {name: self.world.gather(b.detach().reshape(1, -1)).cpu() for name, b in self.model.named_buffers()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        mine = s.get("rank_buffers")
        if mine and self.world.on and all(len(v) == self.world.size for v in mine.values()):
            with torch.no_grad():  # on another number of ranks, every rank starts from rank 0's (the model's)
                for name, b in self.model.named_buffers():
                    b.copy_(mine[name][self.world.rank].view_as(b))
        self.optimizer.load_state_dict(s["optimizer"])
        self.method.load_state_dict(s["method"])
        self.loader.generator.set_state(s["loader_rng"])
        torch.set_rng_state(s["torch_rng"])
        if s.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"])
        self.epoch, self.history, self.stop_reason = s["epoch"], s["history"], s["stop_reason"]
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        self.best = s.get("best")
        self._resume_at = s.get("in_epoch")
        self.run_key = s.get("run_key") or self.run_key  # checkpoints before the key existed keep a new one

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # on every rank: a method's per-example state is gathered from the shards
        if self.world.main:  # one writer: the ranks hold the same state
            checkpoint.save_training_state(self.checkpoint_path, state)

    def try_resume(self) -> bool:
        """Continue from the last completed epoch if a checkpoint of this exact configuration exists."""
        state = checkpoint.load_training_state(self.checkpoint_path)
        if state is None:
            others = [p.name for p in self.checkpoint_path.parent.glob("*.pt") if p != self.checkpoint_path]
            kept = (f" ({len(others)} of other settings or data kept in {self.checkpoint_path.parent}/)"
                    if others else "")
            self.log(f"[{self.cfg.name}] no checkpoint of these settings and data; starting afresh{kept}")
            return False
        if state.get("fingerprint") != self.cfg.train_fingerprint():
            self.log(f"[{self.cfg.name}] {self.checkpoint_path} is from other settings; starting afresh")
            return False
        self.load_state_dict(state)
        done = " (finished: publishing it)" if self.epoch >= self.epochs or self.stop_reason else ""
        where = (f"in epoch {self.epoch + 1}/{self.epochs} after batch {self._resume_at['batch']}/{len(self.loader)}"
                 if self._resume_at else f"after epoch {self.epoch}/{self.epochs}")
        self.log(f"[{self.cfg.name}] resuming {where} from {self.checkpoint_path}{done}")
        return True

    def fit(self, resume: bool = True) -> list[dict]:
        resumed = resume and self.try_resume()
        for cb in self.callbacks:
            cb.on_start(self, resumed)
        if not resumed:  # epoch 0: a run killed in its first epoch restarts into the same MLflow run
            self.save_checkpoint()
        epochs = self.epochs
        ranks = f" x {self.world.size} ranks" if self.world.on else ""
        self.log(f"[{self.cfg.name}] {self.cfg.model} on {self.device}{ranks}, bf16={self.use_bf16}, "
                 f"channels_last={self.channels_last}, {self.n_train} images, {len(self.loader)} batches/epoch")
        self.checkpoints.install()
        try:
            while self.epoch < epochs and self.stop_reason is None:
                metrics = self.run_epoch()
                self.epoch += 1
                self.history.append(metrics)
                if self.stop_reason:
                    self.log(f"[{self.cfg.name}] stopping after epoch {self.epoch}: {self.stop_reason}")
                self.save_checkpoint()
                self.checkpoints.saved()
                faults.fires("train.epoch_end")
                for cb in self.callbacks:
                    cb.on_epoch(self, metrics)
                signum = self.checkpoints.agreed_signal()
                if signum and self.epoch < epochs and self.stop_reason is None:
                    self._preempted(signum, f"after epoch {self.epoch}/{epochs}")
        finally:
            self.checkpoints.uninstall()
        return self.history

    def _save_in_epoch(self, batch: int, epoch_rng: torch.Tensor, seconds: float) -> bool:
        """A checkpoint after `batch` minibatches of the current epoch: what the rest of the epoch needs to continue
        as if it had not stopped (the accumulators summed over the ranks land on the main rank when it resumes). False,
        and nothing written, once the loss has been NaN/inf in this epoch."""
        a = self.agree_epoch()
        if not bool(a["finite"]):  # no checkpoint of NaN weights: the last good one stays, and the epoch's end says so
            return False
        sums = {k: self.world.sum(torch.as_tensor(v, device=self.device)).cpu()
                for k, v in self.method.epoch_sums().items()}
        self._in_epoch = {"batch": batch, "loader_rng": epoch_rng, "seconds": seconds, "steps": self._steps,
                          "step": int(self._acc["step"]), "method": sums,
                          "acc": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}}
        try:
            self.save_checkpoint()
        finally:
            self._in_epoch = None
        self.checkpoints.saved()
        self.world.barrier()  # no rank leaves before the main rank's file is written
        return True

    def _continue_epoch(self, at: dict) -> None:
        """Put back the accumulators of a checkpoint written inside this epoch. The main rank takes the sums over
        the ranks, the others start from zero: what the epoch's all-reduce adds up is the same."""
        self.loader.generator.set_state(at["loader_rng"])
        self._steps = at["steps"]
        main = self.world.main
        a, saved = self._acc, at["acc"]
        for k in ("loss", "grad_l1", "clean_correct", "adv_correct"):
            # the main rank keeps the saved sum's dtype (float64 once summed over ranks): nothing is rounded away
            a[k] = torch.as_tensor(saved[k]).to(self.device) if main else torch.zeros_like(a[k])
        for k in ("n", "clean_n", "adv_n"):
            a[k] = int(saved[k]) if main else 0
        self._image_passes = int(saved["image_passes"]) if main else 0
        a["step"] = torch.tensor(at["step"], dtype=torch.long, device=self.device)
        a["finite"] = torch.tensor(bool(saved["finite"]), device=self.device)
        a["first_bad"] = torch.tensor(int(saved["first_bad"]) if not saved["finite"] else 0, device=self.device)
        self.method.load_epoch_sums({k: v if main else torch.zeros_like(v) for k, v in at["method"].items()})

    def _preempted(self, signum: int, where: str) -> None:
        if self.world.main:
            self.log(f"[{self.cfg.name}] {Preempted(signum, where).args[0]}: checkpoint written to "
                     f"{self.checkpoint_path}; the same command resumes from there")
        raise Preempted(signum, where)

    # --- validation and model selection --------------------------------------------------------------------------

    def published(self) -> torch.nn.Module:
        """The weights validation measures and the model file holds: the EMA when on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def validate(self, epoch: int) -> dict:
        """Clean and PGD-k accuracy on the held-out training images (never the test split), then remember the epoch
        if it is the best so far by the method's selection metric. The attack's random starts come from their own
        generator, seeded by the epoch, so validating does not change what training draws."""
        x, y = self.val
        model = self.published()
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100_003 + epoch)
        robust, _ = worst_case(model, x, y, self.cfg.eps, self.cfg.eps / 4, self.tr["val_pgd_steps"],
                               autocast=self.autocast, norm=self.cfg.threat_model, generator=g, adversarial=False)
        clean = predict(model, x, autocast=self.autocast) == y
        model.train()
        self.model.train()
        out = {"val_clean_acc": clean.sum().item() / len(y), "val_pgd_acc": robust.sum().item() / len(y)}
        metric = self.method.selection_metric
        if self.best is None or out[metric] > self.best["value"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            # weights rolled back in this epoch (FGSM's guard) are the earlier epoch's
            self.best = {"epoch": self.restored_epoch or epoch + 1, "metric": metric, "value": out[metric],
                         "state": state}
        return out

    def selected(self) -> tuple[dict, dict]:
        """(state dict, how it was chosen) of the weights the model file holds: the best validated epoch with
        `select: best`, else the last epoch's (the EMA's when on)."""
        n_val = 0 if self.val is None else len(self.val[1])
        if self.tr["select"] == "best" and self.best is not None:
            b = self.best
            why = (f"highest {b['metric']} ({b['value']:.4f}) on {n_val} held-out training images, epoch "
                   f"{b['epoch']} of {self.epoch}")
            return b["state"], {"select": "best", "epoch": b["epoch"], "metric": b["metric"], "value": b["value"],
                                "val_points": n_val, "ema": self.ema is not None, "why": why}
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.published().state_dict().items()}
        rolled_back = self.history[-1].get("rolled_back_to") if self.history else None
        if rolled_back:  # the last epoch ended by restoring an earlier epoch's weights
            return state, {"select": "last", "epoch": rolled_back, "val_points": n_val, "ema": self.ema is not None,
                           "why": f"epoch {rolled_back}'s weights, rolled back to after epoch {self.epoch}"}
        return state, {"select": "last", "epoch": self.epoch, "val_points": n_val, "ema": self.ema is not None,
                       "why": f"the last epoch ({self.epoch})"}

    # --- what end-of-epoch checks call (FGSM's catastrophic-overfitting guard) ----------------------------------

    def snapshot(self) -> dict:
        """A copy of the model, optimizer and EMA state (on the CPU) at the end of the epoch being run, to roll back
        to."""
        def cpu(obj):
            if isinstance(obj, torch.Tensor):
                return obj.detach().to("cpu", copy=True)
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [cpu(v) for v in obj]
            return obj

        return {"model": cpu(self.model.state_dict()), "optimizer": cpu(self.optimizer.state_dict()),
                "ema": cpu(self.ema.state_dict()) if self.ema is not None else None, "epoch": self.epoch + 1}

    def restore(self, snap: dict) -> None:
        """Back to a snapshot's weights (the EMA's too: it is what is published); the epoch's metrics and the model
        file say which epoch they are from."""
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.ema is not None and snap.get("ema") is not None:
            self.ema.load_state_dict(snap["ema"])
        self.restored_epoch = snap.get("epoch")

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

    def agree_epoch(self) -> dict:
        """The epoch's accumulators summed over the ranks (the NaN stop: the first bad step of any rank), so that
        every per-epoch decision (the magnitude rule, FGSM's guard, the NaN stop) is the same on every rank."""
        a = {**self._acc, "image_passes": self._image_passes}
        if not self.world.on:
            return a
        keys = ("loss", "n", "grad_l1", "clean_correct", "clean_n", "adv_correct", "adv_n", "image_passes")
        summed = self.world.sum(torch.stack([torch.as_tensor(a[k], dtype=torch.float64, device=self.device)
                                             for k in keys]))
        out = dict(zip(keys, summed))
        for k in ("n", "clean_n", "adv_n", "image_passes"):
            out[k] = int(out[k])
        bad = torch.where(a["finite"], torch.iinfo(torch.long).max, a["first_bad"])
        first_bad = self.world.min(bad)
        finite = bool(first_bad == torch.iinfo(torch.long).max)
        return {**out, "finite": finite, "first_bad": first_bad}

    def run_epoch(self) -> dict:
        """One epoch (the next one, `self.epoch`) without checkpointing or callbacks; returns its metrics. `fit`
        calls it; the benchmark (benchmarks/bench.py) times it."""
        epoch = self.epoch
        dev = self.device
        self.begin_epoch()
        steps_in_use = self.method.attack_steps()
        n_batches = len(self.loader)
        report_every = max(1, n_batches // 4)
        at, self._resume_at = self._resume_at, None
        if at:
            self._continue_epoch(at)
        start, earlier = (at["batch"], at["seconds"]) if at else (0, 0.0)
        epoch_rng = self.loader.generator.get_state()  # before the epoch's draws: a mid-epoch checkpoint replays them
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self.loader.batches(start), start):  # under torchrun: this rank's part of batch i
            self._batch = epoch * n_batches + i
            if self.world.on:
                n = self.loader.global_batch(i)
                self._global_n, self._shard = n, self.world.shard(n)
                self._loss_scale = self.world.loss_scale(n, len(y))
            faults.fires("train.batch")
            self.method.step(self, x, y)
            if i + 1 < n_batches:
                save, signum = self.checkpoints.due(i)
                if save:
                    if not self._save_in_epoch(i + 1, epoch_rng, earlier + time.perf_counter() - t0):
                        break  # the loss went NaN/inf: the epoch's end below stops in one line
                    if signum:
                        self._preempted(signum, f"in epoch {epoch + 1}/{self.epochs} after batch {i + 1}/{n_batches}")
                    if self.world.main:
                        self.log(f"[{self.cfg.name}] checkpoint in epoch {epoch + 1}/{self.epochs} after batch "
                                 f"{i + 1}/{n_batches}")
            if (i + 1) % report_every == 0 and i + 1 < n_batches and self.world.main:
                rate = (i + 1 - start) * self.tr["batch_size"] / (time.perf_counter() - t0)
                self.log(f"[{self.cfg.name}] epoch {epoch + 1}/{self.epochs}  batch {i + 1}/{n_batches}  "
                         f"{rate:.0f} img/s")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = earlier + time.perf_counter() - t0
        a = self.agree_epoch()
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
            "passes": round(a["image_passes"] / self.tr["batch_size"], 3),
            "optimizer_steps": self._steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": a["n"] / seconds if seconds > 0 else math.nan,
        }
        self.restored_epoch = None
        metrics.update(self.method.end_epoch(self, epoch, metrics))
        if self.restored_epoch:
            metrics["rolled_back_to"] = self.restored_epoch
        if self.world.on and not self.world.all_true(self.stop_reason is None, dev):
            self.stop_reason = self.stop_reason or "another rank stopped training"
        if self.val is not None and self.world.main:  # only the main rank writes the model file it selects
            metrics.update(self.validate(epoch))
        else:  # every epoch record has the same keys, validated or not: DVC's plots read them by name
            metrics.update(val_clean_acc=None, val_pgd_acc=None)
        pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
        self.log(f"[{self.cfg.name}] epoch {epoch + 1}/{self.epochs}  loss {metrics['loss']:.4f}  "
                 f"clean {pct(metrics['clean_acc'])}  adv {pct(metrics['adv_acc'])}  |grad|_1 {metrics['grad_l1']:.4g}  "
                 f"steps {steps_in_use}  passes {metrics['passes']:g}  {seconds:.1f}s")
        return metrics

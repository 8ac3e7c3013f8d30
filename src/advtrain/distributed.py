"""Data parallelism under torchrun: every rank takes its shard of every global batch, so the global batch, the
schedule and the results are those of one process.

- torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one process (no torchrun) is rank 0 of a world of 1, and every
  function here is then a no-op.
- nccl on CUDA (one device per rank: cuda:LOCAL_RANK), gloo on the CPU.
- A global batch of n is split in contiguous shards (the first n % world ranks take one more). Each rank's loss is
  scaled by (its shard / the mean shard), so DDP's average of the ranks' gradients is the gradient of the global
  batch's mean loss.
- Random draws shaped like the batch (attack starts) are drawn for the whole global batch on every rank, from the
  same generator state, and sliced: 2 ranks draw what 1 process draws, and every rank's generator stays in step.
- Per-epoch sums (loss, accuracies, the gradient magnitude) are all-reduced before anything decides on them.
- Evaluation (evaluate.py) splits a stage's batches among the ranks instead, and gathers each rank's outcomes."""
from __future__ import annotations

import os
from datetime import timedelta

from .lazy import dist, torch


class World:
    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device_in_use = None  # the device the collectives run on (set by start)

    @property
    def launched(self) -> bool:
        """Whether torchrun (or another launcher setting WORLD_SIZE) started this process."""
        return "WORLD_SIZE" in os.environ

    @property
    def on(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The one rank that writes files, logs progress and talks to MLflow."""
        return self.rank == 0

    def start(self, device: torch.device, timeout_minutes: float = 30) -> None:
        """Join the ranks' process group; a collective that waits longer than `timeout_minutes` for a rank fails."""
        self.device_in_use = device
        if self.on and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))

    def device(self, base: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if base.type == "cuda" and self.on else base

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of n."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def loss_scale(self, n_global: int, n_local: int) -> float:
        """What a rank's mean loss is multiplied by, so that averaging gradients over ranks gives the global mean's."""
        return n_local * self.size / n_global if self.on else 1.0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.on:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def min(self, value: torch.Tensor) -> torch.Tensor:
        if self.on:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def max(self, value: torch.Tensor) -> torch.Tensor:
        if self.on:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` holds on every rank (a decision every rank takes alike)."""
        if not self.on:
            return flag
        return bool(self.min(torch.tensor(int(flag), device=device)).item())

    def average_gradients(self, params) -> None:
        """Average the gradients of parameters DDP does not own (a teacher trained alongside) over the ranks, in one
        all-reduce. gloo has no AVG reduction: a SUM, then a division."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.on and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.size
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The global-batch tensor whose shards the ranks hold (every rank gets it): the inverse of `shard`."""
        if not self.on:
            return shard
        sizes = [torch.zeros((), dtype=torch.long, device=shard.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor(len(shard), device=shard.device))
        most = int(max(sizes))
        padded = torch.zeros((most, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        padded[: len(shard)] = shard
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable: small tensors, lists, dicts), in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def stop(self) -> None:
        if self.on and dist.is_initialized():
            dist.destroy_process_group()

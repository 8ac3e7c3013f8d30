"""Checkpoints inside an epoch, and the signals that ask for one: a time limit or a preemption costs minutes, not
the epoch (an adversarial ImageNet epoch takes hours).

- Every `training.checkpoint_minutes` the trainer writes its state at the next minibatch boundary: the batch
  position, the epoch's accumulators and the random states (the stream's order is a function of the seed, so the
  position is enough to replay the rest of the epoch). 0 leaves checkpoints at the ends of epochs only.
- SIGTERM (SLURM's time limit, preemption, `scancel`) and SIGUSR1 (SLURM's `--signal=USR1@SECONDS`, sent before the
  limit) make it write one at the next boundary and stop: the process exits with 128 + the signal's number, a
  failure that Snakemake's `retries` (workflow/profiles/slurm) resubmits, and the same command resumes from there.
  The handler only records the signal: the minibatch in flight finishes, and nothing is written from inside it.
- Under torchrun every rank must stop at the same minibatch. Every CHECK_EVERY minibatches the ranks all-reduce
  their flags (a signal received; the main rank's clock says a checkpoint is due), and all act on the result. One
  process checks at every minibatch.

The trainer calls `due(batch)` after each minibatch and `Preempted` carries the stop to the command line."""
from __future__ import annotations

import signal
import time

from .distributed import World
from .lazy import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECK_EVERY = 8  # minibatches between the ranks' agreements (each one is a small all-reduce and a host sync)


class Preempted(BaseException):
    """Training stopped at a signal after writing a mid-epoch checkpoint. A BaseException, as KeyboardInterrupt is:
    nothing on the way up mistakes it for an error to handle."""

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        super().__init__(f"{signal.Signals(signum).name}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Checkpoints:
    """When a mid-epoch checkpoint is due, and whether training must then stop."""

    def __init__(self, minutes: float, world: World):
        self.every = minutes * 60
        self.world = world
        self.signum: int | None = None
        self.last = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take SIGTERM and SIGUSR1 (in the main thread; elsewhere, as in a test's worker thread, leave them)."""
        try:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._received)
        except ValueError:
            self._previous.clear()

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _received(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def saved(self) -> None:
        self.last = time.monotonic()

    def due(self, batch: int) -> tuple[bool, int | None]:
        """After minibatch `batch` (0-based) of an epoch: (write a checkpoint now, the signal to stop for or None)."""
        timer = self.every > 0 and time.monotonic() - self.last >= self.every
        if not self.world.on:
            return timer or self.signum is not None, self.signum
        if (batch + 1) % CHECK_EVERY:
            return False, None
        flags = torch.tensor([self.signum or 0, int(timer and self.world.main)], dtype=torch.long,
                             device=self.world.device_in_use)
        signum, timer = (int(v) for v in self.world.max(flags).tolist())
        return bool(signum or timer), signum or None

    def agreed_signal(self) -> int | None:
        """At the end of an epoch: the signal any rank received (every rank gets the same answer)."""
        if not self.world.on:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.long, device=self.world.device_in_use)
        return int(self.world.max(flag)) or None

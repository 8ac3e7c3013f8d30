"""The ranks of `training.devices` on this machine: torchrun's own launcher (torch.distributed.run, `--standalone`),
run inside this process instead of replacing it, so that a failed rank is reported in one line of ours instead of
torchrun's ChildFailedError block.

The ranks inherit this process's stdout and stderr: their lines stream as they are printed. Under this launcher a
rank's one-line error (a UserError) goes to the error file torch elastic gives each rank (TORCHELASTIC_ERROR_FILE)
instead of its stderr (cli.py): a refusal that every rank reaches alike is printed once, here, and not once per
rank."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

MARK = "ADVTRAIN_LAUNCHER"  # set for the ranks this launcher starts


@dataclass
class Failure:
    """A rank that ended badly: its global rank, pid, exit code (negative: killed by that signal) and, for a
    UserError, its message."""

    rank: int
    pid: int
    exitcode: int
    message: str | None

    @property
    def how(self) -> str:
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"was killed by {name}"
        return f"exited with code {self.exitcode}"


def launch(ranks: int, argv: list[str]) -> Failure | None:
    """`python -m advtrain ARGV` on `ranks` ranks of this machine, as `torchrun --standalone --nproc-per-node RANKS`
    runs it; None when every rank finished, else the failure to report."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={ranks}", "-m", "advtrain", *argv])
    os.environ[MARK] = "1"
    # torch elastic's own lines (its rendezvous, "Sending process N closing signal SIGTERM", the failure it saw):
    # what went wrong is said once, by the caller
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return _first(e.failures)
    finally:
        quiet.setLevel(level)
        os.environ.pop(MARK, None)
    return None


def _first(failures: dict) -> Failure:
    """The failure to report: a rank's own error message (rank 0's first) before a bare exit code or signal, and a
    rank that died by itself before one the launcher then stopped."""
    found = []
    for rank, f in failures.items():
        message = f.message if isinstance(f.error_file_data, dict) and f.error_file_data.get("advtrain") else None
        found.append(Failure(int(rank), int(f.pid), int(f.exitcode), message))
    return min(found, key=lambda f: (f.message is None, f.exitcode == -signal.SIGTERM, f.rank))


def report_in_rank(message: str) -> bool:
    """In a rank this launcher started: write `message` (a one-line error) to the rank's error file for the launcher
    to print, and return True. Elsewhere False: the caller prints it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(MARK) and path):
        return False
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time()), "advtrain": True}))
    if os.environ.get("RANK", "0") != "0":
        # the launcher stops every rank once one has failed: where rank 0 refuses alike (a setting, the data), its
        # exit comes first and its words are reported, without a rank's name in front
        time.sleep(1.0)
    return True

"""The ranks of `training.devices` or `evaluation.devices` on this machine (relaunch.py): torchrun's own launcher
(torch.distributed.run, `--standalone`), run inside this process instead of replacing it, so that a failed rank is
reported in one line of ours instead of torchrun's ChildFailedError block.

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
    UserError, its message. Rank None: the launcher itself was stopped by the signal (Ctrl-C, a scheduler's
    SIGTERM), and stopped the ranks."""

    rank: int | None
    pid: int
    exitcode: int
    message: str | None
    traceback: str | None = None  # an unexpected exception's, which the rank handed over instead of printing

    @property
    def signal(self) -> str | None:
        """The signal's name, when a signal ended it."""
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    @property
    def how(self) -> str:
        return f"was killed by {self.signal}" if self.signal else f"exited with code {self.exitcode}"


def launch(ranks: int, argv: list[str]) -> Failure | None:
    """`python -m advtrain ARGV` on `ranks` ranks of this machine, as `torchrun --standalone --nproc-per-node RANKS`
    runs it; None when every rank finished, else the failure to report."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={ranks}", "-m", "advtrain", *argv])
    os.environ[MARK] = "1"
    # torch elastic's own lines (its rendezvous, "Sending process N closing signal SIGTERM", the failure it saw):
    # what went wrong is said once, by the caller
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith("torch.distributed.elastic")]  # each has its own level (torch's LOGLEVEL)
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    # SLURM's --signal=USR1 reaches every process of the job: the ranks checkpoint and stop on it (preemption.py),
    # and this process, which torch elastic's handler does not cover, must not die of it first. Ignored, not
    # handled: the ranks start with it ignored until they take it themselves.
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return _first(e.failures)
    except SignalException as e:  # torch elastic's handler of SIGINT/SIGTERM in this process: the ranks are stopped
        return Failure(None, os.getpid(), -int(e.sigval), None)
    finally:
        signal.signal(signal.SIGUSR1, usr1)
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        os.environ.pop(MARK, None)
    return None


def _first(failures: dict) -> Failure:
    """The failure to report: a rank's own error message (rank 0's first) before a bare exit code or signal, and a
    rank that died by itself before one the launcher then stopped."""
    found = []
    for rank, f in failures.items():
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        message = f.message if data.get("advtrain") else None
        found.append(Failure(int(rank), int(f.pid), int(f.exitcode), message, data.get("advtrain_traceback")))
    # a rank killed by a signal of its own comes before a rank whose collective then failed (its peer was gone)
    return min(found, key=lambda f: (f.message is None, not (f.signal and f.exitcode != -signal.SIGTERM), f.rank))


def in_rank() -> bool:
    """Whether this process is a rank this launcher started."""
    return bool(os.environ.get(MARK) and os.environ.get("TORCHELASTIC_ERROR_FILE"))


def traceback_in_rank(text: str) -> bool:
    """In a rank this launcher started: hand an unexpected exception's traceback to the launcher (the rank's error
    file), which prints it only if this rank's failure is the one to report (not when a collective failed because
    another rank had died); True. Elsewhere False: the caller prints it."""
    if not in_rank():
        return False
    _hand_over(message="", advtrain_traceback=text)
    return True


def report_in_rank(message: str) -> bool:
    """In a rank this launcher started: write `message` (a one-line error) to the rank's error file for the launcher
    to print, and return True. Elsewhere False: the caller prints it."""
    if not in_rank():
        return False
    _hand_over(message=message, advtrain=True)
    if os.environ.get("RANK", "0") != "0":
        # the launcher stops every rank once one has failed: where rank 0 refuses alike (a setting, the data), its
        # exit comes first and its words are the ones reported
        time.sleep(1.0)
    return True


def _hand_over(**fields) -> None:
    """Write this rank's error file (torch elastic's TORCHELASTIC_ERROR_FILE), which the launcher reads."""
    path = Path(os.environ["TORCHELASTIC_ERROR_FILE"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"timestamp": int(time.time()), **fields}))

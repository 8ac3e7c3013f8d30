"""What a stage prints: progress lines on stdout, and the same lines in the stage's log file when it has one."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

from .launcher import in_rank, report_in_rank, traceback_in_rank


def error(msg: str) -> None:
    """A command's one-line error, `error: MSG` on stderr; in a rank of the launcher (`advtrain train` or `evaluate`
    on several devices) it is handed to the launcher instead, which prints it once for all the ranks (launcher.py)."""
    if not report_in_rank(msg):
        print(f"error: {msg}", file=sys.stderr, flush=True)


def crashed(text: str) -> bool:
    """An unexpected exception's traceback: in a rank of the launcher it is handed to the launcher, which prints it
    only when that rank's failure is the one to report (True); elsewhere False, for the caller to raise as usual."""
    return traceback_in_rank(text)


def interrupted() -> None:
    """Ctrl-C's one word; a rank of the launcher leaves it to the launcher, which says it once."""
    if not in_rank():
        print("interrupted", file=sys.stderr, flush=True)


def log(msg: str) -> None:
    # one write per line: the ranks of a torchrun world share one terminal, and their lines must not interleave
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class _Log:
    """A stage's log file. It is opened for appending, so a process refused by another's run lock (or killed) never
    truncates the log the other is writing; once this process holds its run (`claim_log`), the file is emptied and
    holds this process's lines, those printed before the claim included."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", buffering=1)  # O_APPEND: two writers' lines never overwrite each other
        self.early: list[str] | None = []  # what was written before the claim

    def write(self, s: str) -> None:
        self.file.write(s)
        if self.early is not None:
            self.early.append(s)

    def flush(self) -> None:
        self.file.flush()

    def claim(self) -> None:
        if self.early is None:
            return
        self.file.flush()
        self.file.truncate(0)  # appends go to the new end: the lines this process printed so far, then the rest
        self.file.write("".join(self.early))
        self.early = None


class _Tee:
    """A text stream that writes to the terminal and to a log file."""

    def __init__(self, stream: TextIO, file: _Log):
        self.stream, self.file = stream, file

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


_log: _Log | None = None


def tee_to(path: str | os.PathLike, claim: bool = True) -> None:
    """From now on, stdout and stderr also go to `path`, as Snakemake's `log:` expects. With `claim`, the file is
    this run's alone from the start (a fresh file); without, lines are appended until `claim_log()`: a command that
    takes a run lock claims its log once it holds the lock."""
    global _log
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _log = _Log(p)
    sys.stdout, sys.stderr = _Tee(sys.stdout, _log), _Tee(sys.stderr, _log)
    if claim:
        _log.claim()


def claim_log() -> None:
    """This process holds its run: its log file (if any) becomes a fresh file holding its own lines."""
    if _log is not None:
        _log.claim()

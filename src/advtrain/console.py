"""What a stage prints: progress lines on stdout, and the same lines in the stage's log file when it has one."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO


def log(msg: str) -> None:
    # one write per line: the ranks of a torchrun world share one terminal, and their lines must not interleave
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class _Tee:
    """A text stream that writes to the terminal and to a log file."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def tee_to(path: str | os.PathLike) -> None:
    """From now on, stdout and stderr also go to `path` (a fresh file each run), as Snakemake's `log:` expects."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    f = open(p, "w", buffering=1)
    sys.stdout, sys.stderr = _Tee(sys.stdout, f), _Tee(sys.stderr, f)

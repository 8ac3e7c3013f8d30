"""One writer per run: a second `advtrain train` (or `evaluate`) of the same run is refused while the first runs,
instead of both writing the same files and the last one winning. And one process at a time for work that several
may start at once but only one may do (creating the MLflow store)."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import UserError


@contextlib.contextmanager
def _lock_file(path: Path) -> Iterator[int]:
    """The lock file's descriptor, its folder made if missing; closing it releases any flock on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (an advisory flock, released when the process ends, even by SIGKILL)."""
    path = Path(lock_file)
    with _lock_file(path) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"another advtrain process (pid {holder}) is {what}: wait for it to finish, or stop it "
                            f"(the lock is {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield


@contextlib.contextmanager
def one_at_a_time(lock_file: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`, waiting while another process holds it (an advisory flock, released
    when the holder ends, even by SIGKILL)."""
    with _lock_file(Path(lock_file)) as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield

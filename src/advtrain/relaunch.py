"""A command on `devices` ranks of this machine: `training.devices` (train, pretrain) or `evaluation.devices`
(evaluate) above 1 outside torchrun runs the same command under torchrun's launcher (launcher.py), and a failed rank
is said in one line that names how the same command resumes. On several nodes, start torchrun yourself: the world is
then torchrun's."""
from __future__ import annotations

import shlex
import signal
import sys
from typing import Callable

from .console import log
from .distributed import World
from .errors import UserError
from .launcher import launch
from .lazy import torch
from .preemption import SIGNALS, Preempted


def relaunch_under_torchrun(name: str, setting: str, devices: int, device: str, argv: list[str] | None, tag: str,
                            resume: Callable[[], str]) -> bool:
    """Run `argv` (this command's arguments) on `devices` ranks when `setting` (e.g. "training.devices") asks for more
    than one and this process is not a rank already. Called before anything is loaded: the ranks load for
    themselves. `resume()` says, after a failure, how the same command goes on ("the same command resumes ...").
    Returns whether the ranks ran (and finished: this process has nothing left to do)."""
    if devices == 1 or World().launched:
        return False
    if device != "cpu":
        visible = torch.cuda.device_count()  # auto with no GPU: gloo ranks on the CPU
        if (device == "cuda" or visible) and visible < devices:
            raise UserError(f"{setting} is {devices} but {visible} CUDA GPUs are visible: lower {setting} or expose "
                            "more GPUs (CUDA_VISIBLE_DEVICES)")
    argv = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
           "-m", "advtrain", *argv]
    log(f"[{tag}] {setting} = {devices}: {shlex.join(cmd)}")
    sys.stdout.flush()
    sys.stderr.flush()
    failure = launch(devices, argv)
    if failure is None:
        return True
    if failure.message:  # a rank's own one-line error (every rank's, when they all refused alike)
        raise UserError(failure.message)  # it names the run; which rank said it first is a race among equals
    how = resume()
    stopped_by = -failure.exitcode if failure.rank is None else failure.exitcode - 128
    if stopped_by in SIGNALS:  # a time limit or preemption: the ranks saved their place and stopped
        log(f"[{tag}] {name}: {signal.Signals(stopped_by).name} stopped the {devices} ranks; {how}")
        raise Preempted(stopped_by, how)
    if failure.rank is None:
        raise UserError(f"{name}: {failure.signal} stopped the {devices} ranks; {how}")
    if failure.traceback:
        sys.stderr.write(failure.traceback)
    above = " (its traceback is above)" if failure.exitcode == 1 else ""
    raise UserError(f"{name}: rank {failure.rank} of {devices} (pid {failure.pid}) {failure.how}{above}; {how}")

"""Fault injection for the reliability tests (tests/test_faults.py): the real process, killed for real.

ADVTRAIN_FAULT holds comma-separated faults `POINT[@MATCH][:N]`: the N-th time (default 1) execution reaches POINT
(whose detail contains MATCH, when given), the fault fires. Points:

  train.batch        before each training minibatch                       -> SIGKILL
  train.epoch_end    after an epoch's checkpoint is saved, before it is logged -> SIGKILL
  train.nan          in each optimizer step: the loss is multiplied by NaN
  evaluate.batch     after each evaluation batch's state is saved (detail: "STAGE I/N", e.g. "apgd-ce 1/3")
                                                                          -> SIGKILL
  write@NAME         an atomic write of a file called NAME: after the temporary file is complete, before the
                     rename that publishes it                               -> SIGKILL

ADVTRAIN_FAULT_RANK=R limits the faults to rank R of a torchrun world (RANK; one process is rank 0).

ADVTRAIN_DELAY holds comma-separated `POINT=SECONDS`: every visit to POINT sleeps that long first (a slow node: the
time-limit tests make training outlast a SLURM job's runtime without using the CPU).

Unset (the normal case), every check is one dictionary lookup."""
from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("ADVTRAIN_FAULT", "")
_FAULTS: dict[str, list[list]] = {}  # point -> [[match, remaining hits]]
for _item in filter(None, (s.strip() for s in _SPEC.split(","))):
    _point, _, _n = _item.partition(":")
    _point, _, _match = _point.partition("@")
    _FAULTS.setdefault(_point, []).append([_match, int(_n or 1)])

if os.environ.get("ADVTRAIN_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    _FAULTS.clear()

NON_KILLING = {"train.nan"}
_DELAYS = {p: float(t) for p, _, t in (item.partition("=") for item in os.environ.get("ADVTRAIN_DELAY", "").split(","))
           if p.strip()}


def fires(point: str, detail: str = "") -> bool:
    """Count a visit to `point`; True when a fault set on it is due (kill points never return then)."""
    if _DELAYS:
        time.sleep(_DELAYS.get(point, 0.0))
    faults = _FAULTS.get(point)
    if not faults:
        return False
    for f in faults:
        if f[0] in detail:
            f[1] -= 1
            if f[1] == 0:
                if point in NON_KILLING:
                    return True
                print(f"[fault] SIGKILL at {point} {detail}".rstrip(), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    return False

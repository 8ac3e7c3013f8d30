"""`advtrain check`: validate params.yaml and list the configured runs, without running anything."""
from __future__ import annotations

from ..config import Params
from ..console import log


def run(params: Params) -> None:
    for m, d in params.runs:
        params.resolve(m, d)
    log(f"{params.path}: valid; runs: " + (", ".join(f"{m}_{d}" for m, d in params.runs) or "none"))

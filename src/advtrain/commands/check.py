"""`advtrain check`: validate params.yaml and list the configured runs, without running anything."""
from __future__ import annotations

from ..config import Params
from ..console import log
from ..io import write_text


def run(params: Params, out: str | None = None) -> None:
    params.require_runs()  # every run was resolved (and refused in one line if it could not run) when loading
    log(f"{params.path}: valid; runs: " + (", ".join(f"{m}_{d}" for m, d in params.runs) or "none")
        + f"; seeds: {params.seeds}")
    if out:  # a marker whose content never changes, so that stages depending on it rerun only for their own reasons
        write_text(out, "params valid\n")

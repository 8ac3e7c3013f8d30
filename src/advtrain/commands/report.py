"""`advtrain report`: the HTML and Markdown report over every configured run, also logged as an MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Params
from ..console import log
from ..errors import UserError
from ..paths import RESULT, result_path
from ..report import build_report
from ..tracking import Tracker


def run(params: Params, out: str) -> None:
    params.require_runs()
    runs = params.runs
    missing = [str(result_path(m, d)) for m, d in runs if not result_path(m, d).exists()]
    if missing:
        raise UserError(f"missing results: {', '.join(missing)}: run `snakemake --cores 2 reports/report.html` "
                        "(or `dvc repro`) to compute them")
    # models trained elsewhere and evaluated on a reported dataset (`advtrain evaluate --model`) join as rows
    datasets = {d for _, d in runs}
    ours = {result_path(m, d) for m, d in runs}
    extra = sorted(p for p in Path(RESULT).parent.glob("*.json") if p not in ours
                   and (r := json.loads(p.read_text())).get("external") and r.get("dataset") in datasets)
    html, md = build_report(runs, Path(out), extra)
    log(f"[report] {len(runs)} runs{f' and {len(extra)} external model(s)' if extra else ''} -> {html}, {md}")
    tracker = Tracker(params.data["tracking"]["experiment"], log=log)
    if tracker.open_run("report", "report", tags={"kind": "report"}):
        tracker.log_artifacts([html, md])
        tracker.log_artifacts(sorted((Path(out) / "figures").glob("*.png")), "figures")
        tracker.finish()

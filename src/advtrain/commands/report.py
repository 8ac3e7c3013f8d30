"""`advtrain report`: the HTML and Markdown report over every configured run, also logged as an MLflow run that
names the training runs it summarises (tags, params and a note with links to them)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Params
from ..console import log
from ..errors import UserError
from ..paths import RESULT, result_path, run_name, seed_result_path
from ..report import build_report
from ..tracking import Tracker, experiment_url


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
    keys = {}  # run name -> the MLflow run key its evaluation recorded
    for m, d in runs:
        for seed in params.seeds:
            p = seed_result_path(m, d, seed)
            if p.exists() and (key := json.loads(p.read_text()).get("mlflow_run_key")):
                keys[run_name(m, d, seed)] = key
    if tracker.open_run("report", "report", tags={"kind": "report"}):
        linked = tracker.find_runs(sorted(set(keys.values())))
        ids = {name: linked[key] for name, key in sorted(keys.items()) if key in linked}
        exp = tracker.experiment_id
        note = "Summarises the training runs:\n\n" + "\n".join(
            f"- [{name}](#/experiments/{exp}/runs/{rid})" for name, rid in ids.items())
        tracker.set_tags({"advtrain.training_runs": ",".join(ids.values()), "mlflow.note.content": note})
        tracker.log_params({f"training_run.{name}": rid for name, rid in ids.items()})
        tracker.log_artifacts([html, md])
        tracker.log_artifacts(sorted((Path(out) / "figures").glob("*.png")), "figures")
        tracker.finish()
        log(f"[report] MLflow: the runs with their robust accuracy at {experiment_url(exp)} "
            "(`mlflow ui --backend-store-uri sqlite:///mlruns.db`)")

"""`advtrain sync METHOD DATASET`: log a run's local records (metrics JSON, prepared data, model file, result JSON)
into the MLflow store, after the store was unreachable while the run trained or was evaluated. Twice is harmless:
nothing is logged twice."""
from __future__ import annotations

import json

from ..config import Params
from ..console import log
from ..errors import UserError
from ..paths import model_path, prepared_dir, seed_result_path, split_identity, train_metrics_path
from ..tracking import Tracker, log_result, run_title, tracking_uri
from .train import log_model


def run(params: Params, method: str, dataset: str, seed: int | None = None) -> None:
    cfg = params.resolve(method, dataset, seed)
    mpath = train_metrics_path(method, dataset, cfg.seed)
    if not mpath.exists():
        raise UserError(f"{mpath}: no local training record to log: train it first (`advtrain train "
                        f"{method} {dataset}`)")
    metrics = json.loads(mpath.read_text())
    tracker = Tracker(cfg.experiment, log=log)
    key = metrics.get("mlflow_run_key")
    if not tracker.open_run(run_title(cfg.name, key or ""), key, tags={"method": cfg.method, "dataset": cfg.dataset,
                                                                      "model": cfg.model, "run": cfg.name}):
        raise UserError(f"MLflow store {tracking_uri()} is still unreachable: set MLFLOW_TRACKING_URI to a reachable "
                        "one and rerun `advtrain sync`")
    tracker.log_params(metrics["params"])
    tracker.log_epochs(metrics["epochs"])
    tracker.log_totals(metrics["totals"], len(metrics["epochs"]))
    tracker.log_artifacts([mpath])
    data = prepared_dir(dataset)
    data_meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").exists() else None
    if data_meta:
        tracker.log_dataset(f"{dataset}/train", *split_identity(data, data_meta, "train"), "training",
                            {"n": data_meta.get("n_train"), "shape": data_meta.get("shape")})
    model = model_path(method, dataset, cfg.seed)
    if model.exists():
        log_model(tracker, cfg, model, metrics.get("selection"))
    tracker.finish()
    rpath = seed_result_path(method, dataset, cfg.seed)
    if rpath.exists():
        log_result(cfg, json.loads(rpath.read_text()), rpath, log, data if data_meta else None, data_meta)
    log(f"[sync] {cfg.name}: {len(metrics['epochs'])} epochs{' and the evaluation' if rpath.exists() else ''} "
        f"logged to {tracking_uri()} (run {tracker.run_id})")

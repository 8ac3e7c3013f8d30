"""MLflow adapter: one run per distinct training configuration of a (method, dataset), named METHOD_DATASET@FINGERPRINT;
training logs params and per-epoch metrics (step = epoch), evaluation logs its metrics and files into the same run.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db (MLflow 3 refuses the plain ./mlruns file store).
An unreachable store never stops training: it warns once and the local metrics JSON stays the record;
`advtrain sync METHOD DATASET` logs that record later. Runs are found again by a key of our own (the tag
`advtrain_run_key`, kept in the checkpoint and the model file), so a resumed, evaluated or synced run lands in the
same MLflow run, whichever store was reachable when."""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlruns.db"
KEY_TAG = "advtrain_run_key"


def run_title(name: str, key: str) -> str:
    """An MLflow run's name: the run and its settings' fingerprint, so retrains with other settings differ."""
    return f"{name}@{key[:8]}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """Talks to MLflow through its client API (no global active run). All failures degrade to one warning."""

    def __init__(self, experiment: str, log=print):
        self.experiment = experiment
        self.log = log
        self.client = None
        self.run_id: str | None = None
        self.disabled = False

    def _warn(self, what: str, e: Exception) -> None:
        if not self.disabled:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.log(f"warning: MLflow tracking at {tracking_uri()} failed while {what} ({first}); "
                     "continuing without it: the metrics JSON files keep the record")
        self.disabled = True

    def _connect(self):
        if self.client is None:
            uri = tracking_uri()
            url = urllib.parse.urlparse(uri)
            if url.scheme in ("http", "https"):
                # fail in seconds, not after MLflow's minutes of retries: the metrics JSON keeps the record anyway
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=5).close()
            from mlflow.tracking import MlflowClient

            _quiet_mlflow()  # after the import, which sets its own levels
            self.client = MlflowClient(uri)
        return self.client

    def open_run(self, name: str, key: str | None = None, tags: dict | None = None, fresh: bool = False) -> str | None:
        """Reopen the run tagged with our `key` if the store has it, else start a new run called `name`.
        `fresh`: training starts over (no checkpoint of these settings): an earlier run with the key is superseded
        (moved to MLflow's deleted runs, where the UI can still show and restore it) rather than logged into twice."""
        if self.disabled:
            return None
        try:
            client = self._connect()
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
            if key:
                found = client.search_runs([exp_id], filter_string=f"tags.{KEY_TAG} = '{key}'", max_results=1)
                if found and fresh:
                    client.delete_run(found[0].info.run_id)
                    self.log(f"[{name}] MLflow run {found[0].info.run_id} of these settings is superseded by this "
                             "fresh start (moved to MLflow's deleted runs)")
                elif found:
                    self.run_id = found[0].info.run_id
                    client.update_run(self.run_id, status="RUNNING")
                    return self.run_id
            all_tags = {**(tags or {}), **({KEY_TAG: key} if key else {})}
            self.run_id = client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
            return self.run_id
        except Exception as e:
            self._warn("opening a run", e)
            return None

    def logged_steps(self, metric: str) -> set[int]:
        """The steps at which `metric` is already in the run (to log a resumed or synced history only once)."""
        if self.disabled or not self.run_id:
            return set()
        try:
            return {m.step for m in self.client.get_metric_history(self.run_id, metric)}
        except Exception as e:
            self._warn("reading the run's history", e)
            return set()

    def log_epoch(self, metrics: dict) -> None:
        """One epoch's training metrics, as `train_*` at step = epoch."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=metrics["epoch"], prefix="train_")

    def log_epochs(self, epochs: list[dict]) -> None:
        """Per-epoch metrics of every epoch the run does not hold yet."""
        done = self.logged_steps("train_loss")
        for metrics in epochs:
            if metrics["epoch"] not in done:
                self.log_epoch(metrics)

    def log_totals(self, totals: dict, epochs: int) -> None:
        """A training run's totals, as `train_total_*` at the last epoch's step; once, however often it is published."""
        if epochs not in self.logged_steps("train_total_epochs"):
            self.log_metrics({f"total_{k}": v for k, v in totals.items()}, step=epochs, prefix="train_")

    def log_params(self, params: dict[str, Any]) -> None:
        if self.disabled or not self.run_id:
            return
        from mlflow.entities import Param

        try:
            existing = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
            for i in range(0, len(new), 100):
                self.client.log_batch(self.run_id, params=new[i:i + 100])
        except Exception as e:
            self._warn("logging params", e)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, prefix: str = "") -> None:
        if self.disabled or not self.run_id:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [Metric(prefix + k, float(v), ts, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        try:
            self.client.log_batch(self.run_id, metrics=rows)
        except Exception as e:
            self._warn("logging metrics", e)

    def log_artifacts(self, paths: list[str | Path], folder: str | None = None) -> None:
        if self.disabled or not self.run_id:
            return
        try:
            for p in paths:
                if Path(p).exists():
                    self.client.log_artifact(self.run_id, str(p), folder)
        except Exception as e:
            self._warn("logging artifacts", e)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.disabled or not self.run_id:
            return
        try:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
        except Exception as e:
            self._warn("setting tags", e)

    def finish(self, status: str = "FINISHED") -> None:
        if self.disabled or not self.run_id:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            self._warn("closing the run", e)


class TrainingTracker(Tracker):
    """A trainer callback: params at the start, every epoch's metrics, the run key kept in the checkpoint.

    On a resumed run it first logs the epochs the checkpoint holds but the run does not (a kill can fall between an
    epoch's checkpoint and its logging), so every epoch is in the run exactly once."""

    def on_start(self, trainer, resumed: bool) -> None:
        cfg = trainer.cfg
        trainer.run_id = self.open_run(run_title(cfg.name, trainer.run_key), trainer.run_key, fresh=not resumed,
                                       tags={"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model,
                                             "run": cfg.name})
        self.log_params({**cfg.flat_params(), "device": str(trainer.device), "bf16": trainer.use_bf16})
        if resumed:
            self.log_epochs(trainer.history)

    def on_epoch(self, trainer, metrics: dict) -> None:
        self.log_epoch(metrics)


def eval_metrics(res: dict) -> dict:
    """The flat MLflow metrics of a result record."""
    flat = {"eval_clean_acc": res["clean_acc"], "eval_robust_acc": res["robust_acc"], "eval_n_points": res["n_points"]}
    for family in ("pgd", "cw"):
        if family in res:
            flat[f"eval_{family}_acc"] = res[family]["acc"]
    if "autoattack" in res:
        for attack, acc in res["autoattack"]["robust_acc_after"].items():
            flat[f"eval_aa_{attack}"] = acc
        flat["eval_autoattack_acc"] = res["autoattack"]["robust_acc"]
    return flat


def log_result(cfg, record: dict, path: Path, log=print) -> None:
    """An evaluation's metrics and result file, into the training run it evaluates."""
    tracker = Tracker(cfg.experiment, log=log)
    key = record.get("mlflow_run_key")
    if tracker.open_run(run_title(cfg.name, key or ""), key, tags={"method": cfg.method, "dataset": cfg.dataset,
                                                                  "run": cfg.name}):
        tracker.log_metrics(eval_metrics(record))
        tracker.log_artifacts([path])
        tracker.finish()

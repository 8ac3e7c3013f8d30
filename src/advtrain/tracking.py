"""MLflow adapter: one run per distinct training configuration of a (method, dataset), named METHOD_DATASET@FINGERPRINT;
training logs params, per-epoch metrics (step = epoch), system metrics, its prepared dataset as an input and the
trained model (registered as advtrain-METHOD-DATASET); evaluation logs its metrics and files into the same run, tags
the model version with its accuracies and moves the registered model's alias `evaluated` to it.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the project folder (MLflow 3 refuses the plain
./mlruns file store); inside a DVC experiment's temporary copy of the workspace (.dvc/tmp/exps/...), the project
folder is the workspace it was copied from, so queued experiments log into the same store.
An unreachable store never stops training: it warns once and the local metrics JSON stays the record;
`advtrain sync METHOD DATASET` logs that record later. Runs are found again by a key of our own (the tag
`advtrain_run_key`, kept in the checkpoint and the model file), so a resumed, evaluated or synced run lands in the
same MLflow run, whichever store was reachable when."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .locking import one_at_a_time
from .paths import split_identity

DEFAULT_URI = "sqlite:///mlruns.db"
KEY_TAG = "advtrain_run_key"
ALIAS = "evaluated"  # the registered model's alias that evaluation moves to the version it evaluated
PRIMARY_METRIC = "eval_robust_acc"
VIEW_KEY = "advtrain"  # the shared view of the runs table: #/experiments/ID/runs?viewStateShareKey=advtrain
DIGEST_CHARS = 36  # MLflow's cap on a dataset digest: the sha256's prefix is the digest, the whole one a tag
# What the experiment page shows: its kind (classic model training, where MLflow 3.17 reads it: the experiment's
# type selector, and its side bar when no `workflowType` is chosen), robust accuracy as its primary metric, and the
# shared view of experiment_url(): the accuracy columns, sorted by robust accuracy.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.experiment.primaryMetric.name": PRIMARY_METRIC,
    "mlflow.experiment.primaryMetric.greaterIsBetter": "true",
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps({
        "orderByKey": f"metrics.`{PRIMARY_METRIC}`", "orderByAsc": False, "searchFilter": "",
        "selectedColumns": [f"metrics.`{m}`" for m in (PRIMARY_METRIC, "eval_clean_acc", "eval_autoattack_acc",
                                                       "eval_pgd_acc", "train_total_passes", "train_total_seconds")]
        + ["tags.`run`", "tags.`method`", "attributes.`Models`"]}),
}


def run_title(name: str, key: str) -> str:
    """An MLflow run's name: the run and its settings' fingerprint, so retrains with other settings differ."""
    return f"{name}@{key[:8]}"


def project_root() -> Path:
    """The project folder that holds the default store: the working directory, except inside a DVC experiment's
    temporary copy of the workspace (`dvc exp run --queue`, `--temp`: .dvc/tmp/exps/...), which is deleted after the
    experiment: there it is the workspace the copy was made from."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = project_root()
    return DEFAULT_URI if root == Path.cwd().resolve() else f"sqlite:///{root / 'mlruns.db'}"


def registered_name(method: str, dataset: str) -> str:
    """The registry's name for the models of a (method, dataset): every seed and setting is a version of it."""
    return f"advtrain-{method}-{dataset}"


def experiment_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """Where the runs table with robust accuracy opens. MLflow 3.17's UI lands on its GenAI overview: its side bar
    follows the `workflowType` of the URL (else the browser's last choice, GenAI at first), not the experiment's tag,
    so the URL names the classic one; the shared view selects the accuracy columns, sorted by robust accuracy."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (sqlite:///relative.db, sqlite:////absolute.db), else None."""
    return Path(uri[len("sqlite:///"):]) if urllib.parse.urlparse(uri).scheme == "sqlite" else None


def store_setup(uri: str | None = None):
    """Held while a process opens the tracking store and finds or creates its experiment. Snakemake starts several
    jobs at once: on a new sqlite store each would create the tables and run MLflow's migrations, and they fail on
    each other's half-made schema ("duplicate column name"); two would create the same experiment. A server's
    store needs no lock."""
    db = _sqlite_file(uri or tracking_uri())
    return contextlib.nullcontext() if db is None else one_at_a_time(db.with_name(db.name + ".lock"))


def open_client(uri: str):
    """An MlflowClient of `uri`. A new sqlite store is made whole under a temporary name and then renamed into place
    (MLflow's migrations are many steps: a process killed among them, say in its first epoch while the store is set
    up beside it, would leave a half-migrated file that every later run fails on)."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # after the import, which sets its own levels
    db = _sqlite_file(uri)
    with store_setup(uri):
        if db is not None:
            _remove_stale_temporaries(db)
        if db is not None and not db.exists():
            db.parent.mkdir(parents=True, exist_ok=True)
            tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            MlflowClient(f"sqlite:///{tmp}")  # creates the tables and runs every migration
            os.replace(tmp, db)
        return MlflowClient(uri)


def _remove_stale_temporaries(db: Path) -> None:
    """The temporary stores (and sqlite's journals of them) that processes killed while creating the store left
    beside it: .NAME.PID.tmp, .NAME.PID.tmp-journal. Called under the store's set-up lock; only the files of
    processes that are gone are removed (a file whose PID is alive is left to that process)."""
    for f in db.parent.glob(f".{db.name}.*.tmp*"):
        pid = f.name[len(db.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # gone
            f.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


_warming: threading.Thread | None = None


def warm_up() -> None:
    """Import MLflow and open the tracking store on a background thread, for a command that logs only when its work
    is done (evaluation): the 2-4 s that takes overlap the work instead of following it. The first Tracker to
    connect waits for it; a failure here is left for that connection to report."""
    global _warming

    def work() -> None:
        try:
            if urllib.parse.urlparse(tracking_uri()).scheme in ("http", "https"):  # a server is asked later
                import mlflow.tracking  # noqa: F401
            else:
                open_client(tracking_uri())
        except Exception:
            pass

    if _warming is None:
        _warming = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
        _warming.start()


class Tracker:
    """Talks to MLflow through its client API (no global active run). All failures degrade to one warning."""

    def __init__(self, experiment: str, log=print):
        self.experiment = experiment
        self.log = log
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.disabled = False

    def _warn(self, what: str, e: Exception) -> None:
        if not self.disabled:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.log(f"warning: MLflow tracking at {tracking_uri()} failed while {what} ({first}); "
                     "continuing without it: the metrics JSON files keep the record")
        self.disabled = True

    def _connect(self):
        if self.client is None:
            if _warming is not None:
                _warming.join()
            uri = tracking_uri()
            url = urllib.parse.urlparse(uri)
            if url.scheme in ("http", "https"):
                # fail in seconds, not after MLflow's minutes of retries: the metrics JSON keeps the record anyway
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=5).close()
            self.client = open_client(uri)
        return self.client

    def open_run(self, name: str, key: str | None = None, tags: dict | None = None, fresh: bool = False) -> str | None:
        """Reopen the run tagged with our `key` if the store has it, else start a new run called `name`.
        `fresh`: training starts over (no checkpoint of these settings): an earlier run with the key is superseded
        (moved to MLflow's deleted runs, where the UI can still show and restore it) rather than logged into twice."""
        if self.disabled:
            return None
        try:
            client = self._connect()
            exp_id = self.experiment_id = self._experiment(client)
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

    def _experiment(self, client) -> str:
        """The experiment's id, created with the tags that make MLflow's UI open on its runs table."""
        with store_setup():
            return self._find_or_create_experiment(client)

    def _find_or_create_experiment(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            # artifacts beside the store: MLflow's default (./mlruns) would land in a DVC experiment's temporary copy
            where = None if os.environ.get("MLFLOW_TRACKING_URI") else (project_root() / "mlruns").as_uri()
            exp_id = client.create_experiment(self.experiment, artifact_location=where)
            tags = {}
        else:
            exp_id, tags = exp.experiment_id, exp.tags
        for k, v in EXPERIMENT_TAGS.items():
            if tags.get(k) != v:
                client.set_experiment_tag(exp_id, k, v)
        return exp_id

    def find_runs(self, keys: list[str]) -> dict[str, str]:
        """{run key: run id} of the runs tagged with these keys (the training runs a report summarises)."""
        if self.disabled or not keys:
            return {}
        try:
            client = self._connect()
            exp_id = self.experiment_id = self.experiment_id or self._experiment(client)
            found = {}
            for key in keys:
                runs = client.search_runs([exp_id], filter_string=f"tags.{KEY_TAG} = '{key}'", max_results=1)
                if runs:
                    found[key] = runs[0].info.run_id
            return found
        except Exception as e:
            self._warn("finding runs", e)
            return {}

    def log_dataset(self, name: str, path: Path, sha256: str, context: str, profile: dict) -> None:
        """A prepared split as the run's input: MLflow's digest is the file's sha256 cut to MLflow's 36 characters;
        the whole sha256 is the input's tag `sha256` and in the dataset's profile."""
        if self.disabled or not self.run_id:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=sha256[:DIGEST_CHARS], source_type="local",
                          source=json.dumps({"uri": str(Path(path).resolve())}),
                          profile=json.dumps({"sha256": sha256, **profile}))
        try:
            self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context),
                                                                        InputTag("sha256", sha256)])])
        except Exception as e:
            self._warn("logging the dataset", e)

    def model_version(self, name: str):
        """The registered version of `name` that this run logged, or None."""
        found = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        return max(found, key=lambda v: int(v.version)) if found else None

    def log_model(self, model, name: str, shape: list[int], classes: int, description: str) -> str | None:
        """The trained classifier as an MLflow model of this run, registered as a version of `name`; once per run
        (a re-published or synced run keeps the version it has). Returns the version."""
        if self.disabled or not self.run_id:
            return None
        try:
            version = self.model_version(name)
            if version is None:
                version = self._log_model(model, name, shape, classes, description)
            return version.version
        except Exception as e:
            self._warn("logging the model", e)
            return None

    def _log_model(self, model, name: str, shape: list[int], classes: int, description: str):
        import mlflow
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        # the [0, 1] image contract: normalisation is the model's first layer, attacks work on raw pixels
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape), "images")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "logits")]))
        contract = {"input": f"float32 images (N, {', '.join(map(str, shape))}), pixels in [0, 1], not normalised "
                             "(the model normalises)", "output": f"logits (N, {classes})"}
        mlflow.set_tracking_uri(tracking_uri())  # log_model goes through MLflow's global state
        mlflow.set_experiment(experiment_id=self.experiment_id)
        with _quiet("mlflow.pytorch", "mlflow.models.model", "mlflow.tracking._model_registry"):
            info = mlflow.pytorch.log_model(model.eval().cpu(), name="model", run_id=self.run_id, signature=signature,
                                            serialization_format="pickle", registered_model_name=name,
                                            metadata=contract, pip_requirements=_requirements())
        version = self.client.get_model_version(name, str(info.registered_model_version))
        self.client.update_model_version(name, version.version, description=description)
        self.client.update_registered_model(name, description=(
            f"{contract['input']} -> {contract['output']}. Alias @{ALIAS}: the version evaluated last; its "
            "accuracies are the version's tags."))
        return version

    def mark_evaluated(self, name: str, accuracies: dict[str, float], seed: int) -> None:
        """Evaluation's word on this run's registered model: its accuracies as tags of the version, and the alias
        `evaluated` moved to that version."""
        if self.disabled or not self.run_id:
            return
        try:
            version = self.model_version(name)
            if version is None:
                return
            for k, v in {**{k: f"{v:.6g}" for k, v in accuracies.items()}, "seed": str(seed)}.items():
                self.client.set_model_version_tag(name, version.version, k, v)
            self.client.set_registered_model_alias(name, ALIAS, version.version)
        except Exception as e:
            self._warn("tagging the model version", e)

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
    """A trainer callback: params and the training data at the start, system metrics while it trains, every epoch's
    metrics, the run key kept in the checkpoint.

    On a resumed run it first logs the epochs the checkpoint holds but the run does not (a kill can fall between an
    epoch's checkpoint and its logging), so every epoch is in the run exactly once.

    The callbacks' MLflow calls run in order on one background thread, so that importing MLflow and opening the store
    (2-4 s) overlap the first epoch rather than delay it, and an epoch's logging never holds up the next; `wait()`
    returns once they are done, and every other call of this class is made after it."""

    def __init__(self, experiment: str, data: Path, data_meta: dict, log=print):
        super().__init__(experiment, log=log)
        self.data, self.data_meta = Path(data), data_meta
        self.monitor = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._pending: list[Future] = []

    def on_start(self, trainer, resumed: bool) -> None:
        self._pending.append(self._thread.submit(self._start, trainer, resumed, list(trainer.history)))

    def on_epoch(self, trainer, metrics: dict) -> None:
        self._pending.append(self._thread.submit(self.log_epoch, dict(metrics)))

    def wait(self) -> None:
        """Until the callbacks' MLflow calls are done (their failures are warnings already)."""
        for done in self._pending:
            done.result()
        self._pending.clear()

    def _start(self, trainer, resumed: bool, history: list[dict]) -> None:
        cfg = trainer.cfg
        trainer.run_id = self.open_run(run_title(cfg.name, trainer.run_key), trainer.run_key, fresh=not resumed,
                                       tags={"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model,
                                             "run": cfg.name})
        self.start_system_metrics()
        self.log_params({**cfg.flat_params(), "device": str(trainer.device), "bf16": trainer.use_bf16})
        meta = self.data_meta
        self.log_dataset(f"{cfg.dataset}/train", *split_identity(self.data, meta, "train"), "training",
                         {"n": meta.get("n_train"), "shape": meta.get("shape")})
        if resumed:
            self.log_epochs(history)

    def start_system_metrics(self) -> None:
        """CPU, memory, disk and network (psutil), and GPU where one is (pynvml), as `system/*` every second."""
        if self.disabled or not self.run_id:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            with _quiet("mlflow.system_metrics"):
                self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=1, samples_before_logging=1,
                                                    resume_logging=True, tracking_uri=tracking_uri())
                self.monitor.start()
        except Exception as e:  # psutil missing: the run goes on without system metrics
            self.log(f"warning: no MLflow system metrics ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
            self.monitor = None

    def finish(self, status: str = "FINISHED") -> None:
        self.wait()
        self._thread.shutdown()
        if self.monitor is not None:
            with _quiet("mlflow.system_metrics"):
                self.monitor.finish()  # its last samples are flushed before the run is closed
            if not self._has_system_metrics():
                # the monitor logs a sample only after a whole interval: a run shorter than that (its start overlaps
                # the first epoch) gets one sample now
                self.monitor.collect_metrics()
                self.log_metrics(self.monitor.aggregate_metrics(), prefix="system/")
            self.monitor = None
        super().finish(status)

    def _has_system_metrics(self) -> bool:
        try:
            return any(k.startswith("system/") for k in self.client.get_run(self.run_id).data.metrics)
        except Exception as e:
            self._warn("reading the run's metrics", e)
            return True


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


def log_result(cfg, record: dict, path: Path, log=print, data: Path | None = None,
               data_meta: dict | None = None) -> None:
    """An evaluation's metrics and result file, into the training run it evaluates; the test split as the run's
    evaluation input; the accuracies on the run's registered model version, and the alias `evaluated` moved to it."""
    tracker = Tracker(cfg.experiment, log=log)
    key = record.get("mlflow_run_key")
    if tracker.open_run(run_title(cfg.name, key or ""), key, tags={"method": cfg.method, "dataset": cfg.dataset,
                                                                  "run": cfg.name}):
        tracker.log_metrics(eval_metrics(record))
        tracker.log_artifacts([path])
        if data is not None and data_meta is not None:
            tracker.log_dataset(f"{cfg.dataset}/test", *split_identity(data, data_meta, "test"), "evaluation",
                                {"n": record["n_points"], "shape": data_meta.get("shape")})
        accuracies = {"clean_acc": record["clean_acc"], "robust_acc": record["robust_acc"]}
        if "autoattack" in record:
            accuracies["autoattack_acc"] = record["autoattack"]["robust_acc"]
        tracker.mark_evaluated(registered_name(cfg.method, cfg.dataset), accuracies, cfg.seed)
        tracker.finish()


class _quiet:
    """MLflow's info lines about what it logs (and its warning that pickle is unsafe, which we chose knowingly: the
    model's own classes are this package's) are kept off a stage's output while inside."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def _requirements() -> list[str]:
    """The pip requirements the model needs: torch, and this package (the pickled model's classes are ours)."""
    from importlib.metadata import version

    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        reqs.append(f"advtrain=={version('advtrain')}")
    except Exception:
        pass
    return reqs

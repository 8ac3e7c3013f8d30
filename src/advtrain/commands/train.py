"""`advtrain train METHOD DATASET` and `advtrain pretrain METHOD DATASET` (the teacher of a teacher-based method):
train or resume one configuration, then write its model file and metrics JSON, logged to MLflow."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_classifier, save_model
from ..config import Params, RunConfig
from ..console import log
from ..io import write_json
from ..methods import METHODS
from ..locking import exclusive
from ..paths import (checkpoint_path, model_path, prepared_dir, run_lock, teacher_metrics_path, teacher_path,
                     train_metrics_path)
from ..prepared import load_split
from ..provenance import versions
from ..tracking import TrainingTracker, tracking_uri
from ..trainer import Trainer


def fit(cfg: RunConfig, out_model: Path, out_metrics: Path, restart: bool, kind: str = "model", teacher=None) -> None:
    with exclusive(run_lock(cfg.name), f"training or evaluating {cfg.name}"):
        _fit(cfg, out_model, out_metrics, restart, kind, teacher)


def _fit(cfg: RunConfig, out_model: Path, out_metrics: Path, restart: bool, kind: str, teacher) -> None:
    images, labels, meta = load_split(prepared_dir(cfg.dataset), "train")
    tracker = TrainingTracker(cfg.experiment, log=log)
    ckpt = checkpoint_path(cfg.name, cfg.train_fingerprint())
    trainer = Trainer(cfg, images, labels, ckpt, callbacks=[tracker], log=log, teacher=teacher)
    try:
        history = trainer.fit(resume=not restart)
    except BaseException as e:
        tracker.finish(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    totals = {"seconds": sum(h["seconds"] for h in history), "passes": sum(h["passes"] for h in history),
              "optimizer_steps": sum(h["optimizer_steps"] for h in history), "epochs": len(history)}
    model_meta = {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
                  "shape": list(cfg.info["shape"]), "num_classes": cfg.info["classes"], "eps": cfg.eps,
                  "fingerprint": cfg.train_fingerprint(), "mlflow_run_key": trainer.run_key, "train": totals,
                  "stop_reason": trainer.stop_reason, "data_sha256": meta["sha256"]["train.pt"]}
    save_model(out_model, trainer.model, model_meta, kind=kind, teacher=getattr(trainer.method, "teacher", None))
    write_json(out_metrics, {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model,
                             "params": cfg.flat_params(), "device": str(trainer.device), "bf16": trainer.use_bf16,
                             "totals": totals, "stop_reason": trainer.stop_reason, "mlflow_run_id": trainer.run_id,
                             "mlflow_run_key": trainer.run_key, "mlflow_tracking_uri": tracking_uri(),
                             "versions": versions(), "epochs": history})
    tracker.log_totals(totals, len(history))
    if trainer.stop_reason:
        tracker.set_tags({"stop_reason": trainer.stop_reason[:5000]})
    tracker.log_artifacts([out_metrics])
    tracker.finish()
    log(f"[train] {cfg.name}: {totals['epochs']} epochs, {totals['passes']:g} forward/backward passes, "
        f"{totals['seconds']:.1f}s -> {out_model}")


def load_teacher(cfg: RunConfig):
    """The pretrained teacher of a teacher-based run."""
    path = teacher_path(cfg.method, cfg.dataset)
    return load_classifier(path, cfg.info, expect={"dataset": cfg.dataset}, kind="teacher")[1]


def train(params: Params, method: str, dataset: str, restart: bool = False) -> None:
    cfg = params.resolve(method, dataset)
    teacher = load_teacher(cfg) if METHODS[method].needs_teacher else None
    fit(cfg, model_path(method, dataset), train_metrics_path(method, dataset), restart, teacher=teacher)


def pretrain(params: Params, method: str, dataset: str, restart: bool = False) -> None:
    cfg = params.teacher_config(method, dataset)
    fit(cfg, teacher_path(method, dataset), teacher_metrics_path(method, dataset), restart, kind="teacher")

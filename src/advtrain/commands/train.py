"""`advtrain train METHOD DATASET` and `advtrain pretrain METHOD DATASET` (the teacher of a teacher-based method):
train or resume one configuration, then write its model file and metrics JSON, logged to MLflow."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import relaunch, resources
from ..checkpoint import cpu_state, load_classifier, load_training_state, save_model
from ..config import Params, RunConfig
from ..console import claim_log, log
from ..distributed import World
from ..io import write_json
from ..methods import METHODS
from ..locking import exclusive
from ..paths import (checkpoint_path, model_path, prepared_dir, run_lock, teacher_metrics_path, teacher_path,
                     train_metrics_path)
from ..preemption import Preempted
from ..prepared import data_digest, open_split, read_meta
from ..provenance import versions
from ..tracking import TrainingTracker, registered_name, run_title, tracking_uri
from ..trainer import Trainer


def relaunch_under_torchrun(cfg: RunConfig, argv: list[str] | None) -> bool:
    """`training.devices` > 1 outside torchrun: train on that many ranks of this machine (relaunch.py). Returns
    whether the ranks ran (and trained: this process has nothing left to do)."""

    def resume() -> str:
        state = load_training_state(checkpoint_path(cfg.name, fingerprint(cfg)))
        done, at = (state["epoch"], state.get("in_epoch")) if state else (0, None)
        if at:
            return f"the same command resumes in epoch {done + 1} after batch {at['batch']}"
        if done:
            return f"the same command resumes after epoch {done}"
        return "the same command starts it afresh (no epoch had completed)"

    return relaunch.relaunch_under_torchrun(cfg.name, "training.devices", cfg.training["devices"],
                                            cfg.training["device"], argv, "train", resume)


def on_data(cfg: RunConfig, meta: dict) -> RunConfig:
    """The run's settings bound to its prepared training split: a checkpoint is valid for these images only, so other
    prepared data trains afresh under its own key (its train_fingerprint)."""
    return dataclasses.replace(cfg, data_digest=data_digest(meta, "train"))


def fingerprint(cfg: RunConfig) -> str:
    """The fingerprint a run's checkpoint is kept under: its settings and its prepared training split."""
    return on_data(cfg, read_meta(prepared_dir(cfg.dataset))[0]).train_fingerprint()


def fit(cfg: RunConfig, out_model: Path, out_metrics: Path, restart: bool, kind: str = "model", teacher=None) -> None:
    world = World()
    if not world.main:  # the ranks beside the main one train and write nothing (the main one holds the lock)
        return _fit(cfg, out_model, out_metrics, restart, kind, teacher, world)
    with exclusive(run_lock(cfg.name), f"training or evaluating {cfg.name}"):
        claim_log()
        _fit(cfg, out_model, out_metrics, restart, kind, teacher, world)


def _fit(cfg: RunConfig, out_model: Path, out_metrics: Path, restart: bool, kind: str, teacher, world: World) -> None:
    data, meta = open_split(prepared_dir(cfg.dataset), "train", cfg.info)
    cfg = on_data(cfg, meta)
    tracker = TrainingTracker(cfg.experiment, prepared_dir(cfg.dataset), meta, log=log) if world.main else None
    ckpt = checkpoint_path(cfg.name, cfg.train_fingerprint())
    rank_log = log if world.main else (lambda msg: log(f"[rank {world.rank}] {msg}"))
    trainer = Trainer(cfg, data, None, ckpt, callbacks=[tracker] if tracker else [], log=rank_log,
                      teacher=teacher, world=world)
    try:
        history = trainer.fit(resume=not restart)
    except BaseException as e:
        if tracker:
            tracker.finish(status="KILLED" if isinstance(e, (KeyboardInterrupt, Preempted)) else "FAILED")
        raise
    finally:
        world.stop()
    if not world.main:
        return
    tracker.wait()  # the run's id, and its per-epoch metrics logged before its totals
    totals = {"seconds": sum(h["seconds"] for h in history), "passes": sum(h["passes"] for h in history),
              "optimizer_steps": sum(h["optimizer_steps"] for h in history), "epochs": len(history)}
    state, selection = trainer.selected()
    model_meta = {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
                  "shape": list(cfg.info["shape"]), "num_classes": cfg.info["classes"],
                  "threat_model": cfg.threat_model, "eps": cfg.eps, "fingerprint": cfg.train_fingerprint(),
                  "mlflow_run_key": trainer.run_key, "selection": selection,
                  # no wall-clock figure: the same weights give the same bytes (a resumed run's file is the
                  # uninterrupted run's, and DVC sees nothing to re-evaluate); the metrics JSON keeps the seconds
                  "train": {k: v for k, v in totals.items() if k != "seconds"},
                  "stop_reason": trainer.stop_reason, "data_sha256": cfg.data_digest}
    teacher = getattr(trainer.method, "teacher", None)
    save_model(out_model, state, model_meta, kind=kind, teacher=None if teacher is None else cpu_state(teacher))
    write_json(out_metrics, {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model,
                             "params": cfg.flat_params(), "device": str(trainer.device), "bf16": trainer.use_bf16,
                             "totals": totals, "selection": selection, "stop_reason": trainer.stop_reason,
                             "mlflow_run_id": trainer.run_id,
                             "mlflow_run_key": trainer.run_key, "mlflow_tracking_uri": tracking_uri(),
                             "versions": versions(), "epochs": history})
    tracker.log_totals(totals, len(history))
    if trainer.stop_reason:
        tracker.set_tags({"stop_reason": trainer.stop_reason[:5000]})
    tracker.log_artifacts([out_metrics])
    if kind == "model":
        log_model(tracker, cfg, out_model, selection)
    tracker.finish()
    log(f"[train] {cfg.name}: {totals['epochs']} epochs, {totals['passes']:g} forward/backward passes, "
        f"{totals['seconds']:.1f}s; the model file holds {selection['why']} -> {out_model}")


def log_model(tracker, cfg: RunConfig, path: Path, selection: dict | None) -> None:
    """The published model file, read back, as the run's MLflow model and a version of advtrain-METHOD-DATASET."""
    meta, model = load_classifier(path, cfg.info)
    why = f"; {selection['why']}" if selection else ""
    version = tracker.log_model(model, registered_name(cfg.method, cfg.dataset), meta["shape"], meta["num_classes"],
                                f"{run_title(cfg.name, meta['mlflow_run_key'])}: {cfg.method} on {cfg.dataset}, "
                                f"{cfg.threat_model} eps {cfg.eps:.4g}, {cfg.model}{why}")
    if version:
        log(f"[train] {cfg.name}: MLflow model models:/{registered_name(cfg.method, cfg.dataset)}/{version}")


def load_teacher(cfg: RunConfig):
    """The pretrained teacher of a teacher-based run."""
    path = teacher_path(cfg.method, cfg.dataset, cfg.seed)
    return load_classifier(path, cfg.info, expect={"dataset": cfg.dataset}, kind="teacher")[1]


def require_gpus(cfg: RunConfig) -> None:
    """A cluster job planned for GPUs (resources.py) that sees none stops here, before anything is loaded."""
    device = cfg.training["device"]
    planned = resources.planned_gpus(device, cfg.model, cfg.training["devices"])
    resources.require_planned_gpus(planned, cfg.name, f"training.device {device} with {cfg.model}")


def train(params: Params, method: str, dataset: str, seed: int | None = None, restart: bool = False,
          argv: list[str] | None = None) -> None:
    cfg = params.resolve(method, dataset, seed)
    require_gpus(cfg)
    if relaunch_under_torchrun(cfg, argv):
        return
    teacher = load_teacher(cfg) if METHODS[method].needs_teacher else None
    fit(cfg, model_path(method, dataset, cfg.seed), train_metrics_path(method, dataset, cfg.seed), restart,
        teacher=teacher)


def pretrain(params: Params, method: str, dataset: str, seed: int | None = None, restart: bool = False,
             argv: list[str] | None = None) -> None:
    cfg = params.teacher_config(method, dataset, seed)
    require_gpus(cfg)
    if relaunch_under_torchrun(cfg, argv):
        return
    fit(cfg, teacher_path(method, dataset, cfg.seed), teacher_metrics_path(method, dataset, cfg.seed), restart,
        kind="teacher")

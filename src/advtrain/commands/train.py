"""`advtrain train METHOD DATASET` and `advtrain pretrain METHOD DATASET` (the teacher of a teacher-based method):
train or resume one configuration, then write its model file and metrics JSON, logged to MLflow."""
from __future__ import annotations

import dataclasses
import shlex
import signal
import sys
from pathlib import Path

from .. import resources
from ..checkpoint import cpu_state, load_classifier, load_training_state, save_model
from ..config import Params, RunConfig
from ..console import claim_log, log
from ..distributed import World
from ..errors import UserError
from ..io import write_json
from ..launcher import launch
from ..lazy import torch
from ..methods import METHODS
from ..locking import exclusive
from ..paths import (checkpoint_path, model_path, prepared_dir, run_lock, teacher_metrics_path, teacher_path,
                     train_metrics_path)
from ..preemption import SIGNALS, Preempted
from ..prepared import data_digest, open_split, read_meta
from ..provenance import versions
from ..tracking import TrainingTracker, registered_name, run_title, tracking_uri
from ..trainer import Trainer


def relaunch_under_torchrun(cfg: RunConfig, argv: list[str] | None) -> bool:
    """`training.devices` > 1 outside torchrun: run the same command on that many ranks of this machine under
    torchrun's launcher (on several nodes, start torchrun yourself: the world is then torchrun's), and say in one
    line what went wrong if a rank failed. Called before anything is loaded: the ranks load for themselves. Returns
    whether the ranks ran (and trained: this process has nothing left to do)."""
    devices, device = cfg.training["devices"], cfg.training["device"]
    if devices == 1 or World().launched:
        return False
    if device != "cpu":
        visible = torch.cuda.device_count()  # auto with no GPU: gloo ranks on the CPU
        if (device == "cuda" or visible) and visible < devices:
            raise UserError(f"training.devices is {devices} but {visible} CUDA GPUs are visible: lower "
                            "training.devices or expose more GPUs (CUDA_VISIBLE_DEVICES)")
    argv = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
           "-m", "advtrain", *argv]
    log(f"[train] training.devices = {devices}: {shlex.join(cmd)}")
    sys.stdout.flush()
    sys.stderr.flush()
    failure = launch(devices, argv)
    if failure is None:
        return True
    if failure.message:  # a rank's own one-line error (every rank's, when they all refused alike)
        raise UserError(failure.message)  # it names the run; which rank said it first is a race among equals
    state = load_training_state(checkpoint_path(cfg.name, fingerprint(cfg)))
    done, at = (state["epoch"], state.get("in_epoch")) if state else (0, None)
    if at:
        resume = f"the same command resumes in epoch {done + 1} after batch {at['batch']}"
    elif done:
        resume = f"the same command resumes after epoch {done}"
    else:
        resume = "the same command starts it afresh (no epoch had completed)"
    stopped_by = -failure.exitcode if failure.rank is None else failure.exitcode - 128
    if stopped_by in SIGNALS:  # a time limit or preemption: the ranks wrote their checkpoint and stopped
        log(f"[train] {cfg.name}: {signal.Signals(stopped_by).name} stopped the {devices} ranks; {resume}")
        raise Preempted(stopped_by, resume)
    if failure.rank is None:
        raise UserError(f"{cfg.name}: {failure.signal} stopped the {devices} ranks; {resume}")
    if failure.traceback:
        sys.stderr.write(failure.traceback)
    above = " (its traceback is above)" if failure.exitcode == 1 else ""
    raise UserError(f"{cfg.name}: rank {failure.rank} of {devices} (pid {failure.pid}) {failure.how}{above}; "
                    f"{resume}")


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

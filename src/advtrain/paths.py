"""The on-disk layout of a project: every file a stage reads or writes, relative to the project root.

One place for it: the command-line stages, the report and the tests use these functions; the Snakefile builds its
rules from the patterns below, and a test keeps dvc.yaml's paths equal to them.
A run is one (method, dataset, seed); results/METHOD_DATASET.json sums a (method, dataset) up over the seeds of
params.yaml's `runs.seeds`. A teacher is the clean-trained model a teacher-based method learns from
(`Method.needs_teacher`)."""
from __future__ import annotations

from pathlib import Path

PREPARED = "data/prepared/{dataset}"
# written last by `prepare` (after train.pt/test.pt, or the shards): it stands for the whole prepared folder
PREPARED_META = PREPARED + "/meta.json"
MODEL = "models/{method}_{dataset}_seed{seed}.pt"
TRAIN_METRICS = "metrics/train/{method}_{dataset}_seed{seed}.json"
TEACHER = "models/teachers/{method}_{dataset}_seed{seed}.pt"
TEACHER_METRICS = "metrics/teachers/{method}_{dataset}_seed{seed}.json"
SEED_RESULT = "results/seeds/{method}_{dataset}/seed{seed}.json"  # one run's evaluation, beside its other seeds
RESULT = "results/{method}_{dataset}.json"  # over the seeds: what a user asks for
METRICS = "metrics/{method}_{dataset}.json"  # the few numbers of RESULT that DVC shows (`dvc exp show`)
LOG = "logs/{stage}/{name}.log"
REPORT_DIR = "reports"
PARAMS_VALID = "logs/check/params.valid"  # dvc.yaml's check stage: every other stage runs after it
# Resumable state is deliberately not a declared output of any stage: Snakemake and DVC delete declared outputs
# before a job runs, and this is what lets a rerun continue. One slot per distinct setting (its fingerprint), so
# a run with other settings never overwrites finished work: going back to earlier settings re-publishes it.
CHECKPOINT = "checkpoints/{name}/{fingerprint}.pt"
EVAL_STATE = "checkpoints/eval/{name}/{key}.pt"  # an evaluation in progress
EVAL_DONE = "checkpoints/eval/{name}/{key}.json"  # a finished evaluation's record, re-published when asked again


def run_name(method: str, dataset: str, seed: int) -> str:
    return f"{method}_{dataset}_seed{seed}"


def teacher_name(method: str, dataset: str, seed: int) -> str:
    return f"teacher_{run_name(method, dataset, seed)}"


def prepared_dir(dataset: str) -> Path:
    return Path(PREPARED.format(dataset=dataset))


def model_path(method: str, dataset: str, seed: int) -> Path:
    return Path(MODEL.format(method=method, dataset=dataset, seed=seed))


def train_metrics_path(method: str, dataset: str, seed: int) -> Path:
    return Path(TRAIN_METRICS.format(method=method, dataset=dataset, seed=seed))


def teacher_path(method: str, dataset: str, seed: int) -> Path:
    return Path(TEACHER.format(method=method, dataset=dataset, seed=seed))


def teacher_metrics_path(method: str, dataset: str, seed: int) -> Path:
    return Path(TEACHER_METRICS.format(method=method, dataset=dataset, seed=seed))


def seed_result_path(method: str, dataset: str, seed: int) -> Path:
    return Path(SEED_RESULT.format(method=method, dataset=dataset, seed=seed))


def result_path(method: str, dataset: str) -> Path:
    return Path(RESULT.format(method=method, dataset=dataset))


def metrics_path(method: str, dataset: str) -> Path:
    return Path(METRICS.format(method=method, dataset=dataset))


def checkpoint_path(name: str, fingerprint: str) -> Path:
    return Path(CHECKPOINT.format(name=name, fingerprint=fingerprint))


def run_lock(name: str) -> Path:
    """Held while a process trains or evaluates the run `name`."""
    return checkpoint_path(name, "lock").parent / ".lock"


def eval_state_path(name: str, key: str, rank: int = 0) -> Path:
    """An evaluation's state; under torchrun each rank keeps its own (rank 0's is one process's file)."""
    path = Path(EVAL_STATE.format(name=name, key=key[:16]))
    return path.with_name(f"{path.stem}.rank{rank}.pt") if rank else path


def eval_done_path(name: str, key: str) -> Path:
    return Path(EVAL_DONE.format(name=name, key=key[:16]))


def log_path(stage: str, name: str) -> Path:
    return Path(LOG.format(stage=stage, name=name))


def report_dir() -> Path:
    return Path(REPORT_DIR)


def split_identity(prepared: Path, meta: dict, split: str) -> tuple[Path, str]:
    """What identifies a prepared split, from its meta.json: its file (the folder, for shards) and its sha256 (over
    its shards' for shards)."""
    if meta.get("format") == "shards":
        return Path(prepared), meta["sha256"][split]
    return Path(prepared) / f"{split}.pt", meta["sha256"][f"{split}.pt"]

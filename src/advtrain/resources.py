"""What a job asks of a cluster: GPUs, CPUs, memory and runtime, from a run's settings.

The Snakefile's rules take their `resources:` and `threads:` from here (workflow/rules/common.smk), so that the plan
`snakemake --workflow-profile workflow/profiles/slurm -n` shows and a job then checks for itself come from one rule:

- GPUs. `device: cuda` asks for one per rank (`training.devices`, `evaluation.devices`). `device: auto` asks for
  them when the model is a GPU model (ModelSpec.gpu: every model but the small CNN): a cluster job of a ResNet must
  not land on a CPU node and run there until its time limit. `device: cpu` asks for none.
- One node (`nodes=1`): `advtrain train` and `advtrain evaluate` start their ranks with `torchrun --standalone`,
  which uses one machine.
- CPUs and memory per GPU: data-loading workers and pinned batches per rank; more for a streamed (sharded) source,
  whose workers decode JPEGs, than for one held in memory.
- `prepare` of a streamed source: a process per CPU, and a runtime from the number of images.

A job that was planned for GPUs and sees none stops at once with one line (`require_planned_gpus`)."""
from __future__ import annotations

import math
import os

from .errors import UserError
from .lazy import torch
from .models import MODELS

# SIGTERM five minutes before the time limit (SLURM's --signal, sent to every process of the job step): training
# checkpoints at the next minibatch and exits while the job still has time; the limit's own SIGTERM comes only
# KillWait (often 30 s) before SIGKILL. SIGTERM, not SIGUSR1: Snakemake's process in the job step (the executor
# plugin runs the job through `srun ... snakemake`) stops gracefully on SIGTERM and dies of SIGUSR1. A job whose
# runtime is set below about 10 minutes should set slurm_extra itself (it would be signalled at once).
EARLY_SIGNAL = "--signal=TERM@300"
CPUS_PER_GPU = {"streamed": 8, "in_memory": 4}  # loader workers per rank: torchvision's ImageNet recipe uses 8
MEM_MB_PER_GPU = {"streamed": 32000, "in_memory": 16000}
CPU_JOB = {"mem_mb": 16000}
RUNTIME_MIN = {"train": 24 * 60, "evaluate": 24 * 60, "small": 30}
# `prepare` of a streamed source. Each image is decoded at full size, resized and re-encoded: a few to a few tens of
# milliseconds per image and CPU depending on its size. PREPARE_RATE is a deliberately low images/s per CPU, so
# that the time limit holds on a slow node and shared filesystem; ImageNet's extraction from its archives
# (torchvision, 147 GB) comes on top (PREPARE_EXTRACT_MIN).
PREPARE_CPUS = 16
PREPARE_MEM_MB = 16000
PREPARE_RATE = 20
PREPARE_EXTRACT_MIN = 180


def planned_gpus(device: str, model: str, devices: int = 1) -> int:
    """GPUs a job of `model` asks for under `device` (cuda | auto | cpu), one per rank."""
    if device == "cuda" or (device == "auto" and MODELS[model].gpu):
        return devices
    return 0


def kind(info: dict) -> str:
    return "streamed" if "stream" in info else "in_memory"


def gpu_job(gpus: int, info: dict, stage: str) -> dict:
    """resources of a train/pretrain/evaluate job that takes `gpus` GPUs (0: a CPU job)."""
    out = {"gpu": gpus, "nodes": 1, "runtime": RUNTIME_MIN[stage]}
    out["mem_mb"] = MEM_MB_PER_GPU[kind(info)] * gpus if gpus else CPU_JOB["mem_mb"]
    return out


def gpu_threads(gpus: int, info: dict) -> int:
    """CPUs of a GPU job: CPUS_PER_GPU per GPU (Snakemake passes threads on as cpus_per_task)."""
    return CPUS_PER_GPU[kind(info)] * gpus


def prepare_job(source) -> tuple[int, dict]:
    """(threads, resources) of `prepare`: one CPU and 30 minutes for a source held in memory (a download and a
    conversion); for a streamed one, a process per CPU and a runtime sized to its images."""
    if not source.streamed:
        return 1, {"mem_mb": 2000, "runtime": RUNTIME_MIN["small"], "nodes": 1}
    images = source.expected_images()
    minutes = PREPARE_EXTRACT_MIN + (math.ceil(images / (PREPARE_CPUS * PREPARE_RATE) / 60) if images else 24 * 60)
    return PREPARE_CPUS, {"mem_mb": PREPARE_MEM_MB, "runtime": minutes, "nodes": 1}


def require_planned_gpus(gpus: int, what: str, setting: str) -> None:
    """Inside a SLURM job planned for `gpus` GPUs, refuse to go on without one: `device: auto` would otherwise train
    a GPU recipe on the node's CPUs until the time limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not gpus or not job:
        return
    if torch.cuda.device_count() == 0:
        node = os.environ.get("SLURMD_NODENAME", "its node")
        raise UserError(f"{what}: SLURM job {job} on {node} sees no GPU, but {setting} plans {gpus} for it: submit "
                        "it to a GPU partition (workflow/profiles/slurm: set-resources slurm_partition) or set "
                        f"{setting.split(' ')[0]}: cpu to train on CPUs")

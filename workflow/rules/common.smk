# Shared by the rules: the validated settings, the configured runs, the path patterns and the wildcard constraints.
import functools
import json
import os
import sys

from advtrain import paths, resources
from advtrain.config import Params, merge
from advtrain.errors import UserError
from advtrain.evaluate import AA_VERSIONS
from advtrain.methods import METHODS
from advtrain.models import MODELS


def load_params():
    """params.yaml and any --configfile overlays, validated, as the `advtrain` jobs will read them."""
    files = ["params.yaml", *map(str, workflow.overwrite_configfiles)]
    try:
        params = Params.load(",".join(files))
        params.require_runs()
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    if merge(params.raw, config) != params.raw:  # config holds the --configfile overlays and any --config values
        sys.stderr.write("error: `snakemake --config` values do not reach the advtrain jobs: put them in params.yaml "
                         "or in a file given with --configfile\n")
        sys.exit(2)
    if len(files) > 1:
        os.environ["ADVTRAIN_PARAMS"] = ",".join(files)  # the jobs read the same merged settings
    return params


PARAMS = load_params()
config.update(PARAMS.raw)
RUNS = PARAMS.runs  # (method, dataset) pairs; each runs once per seed of SEEDS
SEEDS = PARAMS.seeds


wildcard_constraints:
    method="|".join(sorted(METHODS)),
    dataset="|".join(sorted(PARAMS.data["datasets"])),
    seed=r"\d+",


def needs_teacher(wildcards):
    return METHODS[wildcards.method].needs_teacher


def settings(*keys):
    """A params.yaml sub-tree as a JSON string: a rule whose `params` change is rerun by Snakemake."""

    def get(wildcards):
        node = config
        for k in keys:
            k = k.format(**wildcards)
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return json.dumps(node, sort_keys=True)

    return get


def pattern(template, **fixed):
    """A paths.py template as a Snakemake pattern: its {fields} become wildcards unless fixed here."""
    return template.format(**{k: fixed.get(k, "{" + k + "}") for k in ("method", "dataset", "seed", "stage", "name")})


# --- resources: what a job asks of a cluster (workflow/profiles/slurm); locally only `threads` counts ----------------
# src/advtrain/resources.py says how: GPUs per rank when the recipe needs them (`device: auto` with a GPU model, or
# `cuda`), one node, CPUs and memory per GPU, prepare sized to its dataset. A cluster's profile or
# `--set-resources RULE:KEY=VALUE` changes any of them without editing a rule.
SMALL = dict(mem_mb=2000, runtime=30)


@functools.lru_cache(maxsize=None)
def _run_config(method, dataset, seed, teacher):
    return (PARAMS.teacher_config if teacher else PARAMS.resolve)(method, dataset, int(seed))


def run_config(wildcards, teacher=False):
    """A job's resolved settings (the teacher's for `pretrain`), resolved once for its threads, GPUs and priority."""
    return _run_config(wildcards.method, wildcards.dataset, wildcards.seed, teacher)


def gpus(wildcards, teacher=False, evaluation=False):
    """GPUs of a training job or an evaluation job: one per rank (training.devices, evaluation.devices)."""
    cfg = run_config(wildcards, teacher)
    if evaluation:
        return resources.planned_gpus(cfg.evaluation["device"], cfg.model, cfg.evaluation["devices"])
    return resources.planned_gpus(cfg.training["device"], cfg.model, cfg.training["devices"])


def job_resources(stage, teacher=False, evaluation=False):
    """A train/pretrain/evaluate rule's resources: gpu, nodes, mem_mb, runtime (each a function of the job), and for
    training the early SIGTERM that lets it checkpoint before its time limit (resources.EARLY_SIGNAL)."""

    def get(key):
        return lambda wc: resources.gpu_job(gpus(wc, teacher, evaluation), run_config(wc, teacher).info, stage)[key]

    out = {key: get(key) for key in ("gpu", "nodes", "mem_mb", "runtime")}
    if stage == "train":
        out["slurm_extra"] = resources.EARLY_SIGNAL
    return out


def prepare_resources(key):
    return lambda wc: resources.prepare_job(PARAMS.source(wc.dataset))[1][key]


def longest_first(wildcards):
    """A job's priority: the AutoAttack attacks its run's evaluation makes (standard 4, fast 2, off 0). The evaluation
    with FAB-T and Square is the longest job of a run (in the demo, PGD-AT's: 300 of the workflow's ~1,150 job-seconds),
    so that run's jobs start first and the other runs fill the other cores around it instead of leaving it alone at the
    end (longest-processing-time-first list scheduling)."""
    autoattack = run_config(wildcards).evaluation["autoattack"]
    return len(AA_VERSIONS.get(autoattack, ()))


def rank_threads(wildcards, teacher=False, evaluation=False):
    """A CPU job: its model's cpu_threads (models/base.py), up to the cores given (small_cnn: 1, so `--cores 2` runs
    two jobs side by side). A GPU job: resources.CPUS_PER_GPU per GPU, and no fewer than a CPU job's, since with
    `device: auto` on a machine without a GPU (locally) it trains on the CPU. Snakemake passes it on as
    OMP_NUM_THREADS."""
    cpu = MODELS[run_config(wildcards, teacher).model].cpu_threads
    n = gpus(wildcards, teacher, evaluation)
    if n:
        return max(resources.gpu_threads(n, run_config(wildcards, teacher).info), cpu)
    return min(workflow.cores, cpu)

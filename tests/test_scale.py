"""ImageNet's shape on two CPU cores: the CPUs a job may use, open descriptors bounded however many shards a split
has, and a rehearsal of a 2-rank run over more than 1,300 shards under `ulimit -n 1024` (docs/scaling.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from advtrain.cpus import cgroup_cpu_quota, usable_cpus
from conftest import env


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_usable_cpus_follow_the_affinity_set():
    """A process pinned to one CPU (taskset, SLURM's task affinity) counts one, whatever the machine has."""
    code = ("import os; from advtrain.cpus import usable_cpus; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "print(usable_cpus())")
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "1"
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_cgroup_v2_quota_bounds_the_count_along_the_path_to_the_root(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    write(proc, "0::/job/step\n")
    write(root / "job/step/cpu.max", "max 100000\n")  # no limit of its own
    write(root / "job/cpu.max", "250000 100000\n")  # the job's: 2.5 CPUs
    assert cgroup_cpu_quota(root, proc) == 2.5
    assert usable_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))
    write(root / "job/step/cpu.max", "50000 100000\n")  # half a CPU: still one process
    assert cgroup_cpu_quota(root, proc) == 0.5 and usable_cpus(root, proc) == 1
    write(root / "job/step/cpu.max", "max 100000\n")
    write(root / "job/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None and usable_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_a_cgroup_v1_quota_counts_too_and_a_container_sees_its_own_cgroup_as_root(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    write(proc, "5:memory:/x\n4:cpu,cpuacct:/\n0::/\n")  # a container: its cgroup namespace shows "/"
    write(root / "cpu,cpuacct/cpu.cfs_quota_us", "100000\n")
    write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, proc) == 1.0 and usable_cpus(root, proc) == 1
    write(root / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # v1's "no limit"
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(root, tmp_path / "missing") is None


def test_held_out_and_test_points_stay_uint8_and_give_the_numbers_of_float_points(tmp_path):
    """Validation, a method's holdout and evaluation keep their points as uint8 and make each batch float: the same
    robust flags and the same evaluation record as float points."""
    import torch

    from advtrain.attacks import worst_case
    from advtrain.evaluate import evaluate
    from advtrain.trainer import Trainer
    from test_methods import config, synthetic

    cfg = config("fgsm", {"check_points": 50}, {"epochs": 1, "batch_size": 50, "lr": 0.02, "val_points": 80,
                                                "select": "best"})
    t = Trainer(cfg, *synthetic(300), tmp_path / "c.pt", log=lambda m: None)
    assert t.val[0].dtype == torch.uint8 and t.holdout[0].dtype == torch.uint8 and len(t.val[0]) == 80
    t.fit()
    x, y = t.val
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    robust8, none = worst_case(t.model, x, y, 0.1, 0.025, 2, restarts=2, generator=g(), adversarial=False)
    robust32, _ = worst_case(t.model, x.float() / 255, y, 0.1, 0.025, 2, restarts=2, generator=g())
    assert none is None and torch.equal(robust8, robust32)
    ev = {**cfg.evaluation, "pgd_steps": 2, "cw_steps": 2, "pgd_restarts": 1, "autoattack": "off", "batch_size": 32}
    runs = [evaluate(t.model, points, y, 0.1, ev, 0, torch.device("cpu"), log=lambda m: None)
            for points in (x, x.float() / 255)]
    for r in runs:
        r.pop("seconds")
    assert runs[0] == runs[1]

"""ImageNet's shape on two CPU cores: the CPUs a job may use, open descriptors bounded however many shards a split
has, and a rehearsal of a 2-rank run over more than 1,300 shards under `ulimit -n 1024` (docs/scaling.md)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from advtrain.cpus import cgroup_cpu_quota, usable_cpus
from advtrain.prepared import open_split
from advtrain.shards import OPEN_SHARDS
from advtrain.stream import StreamLoader, crop_resize
from conftest import ROOT, env

sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_rehearsal  # noqa: E402  (benchmarks/scale_rehearsal.py: the rehearsal, its sampler and its figures)


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


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """benchmarks/scale_rehearsal.py with its defaults: 2,640 tiny training images in 1,320 shards of 2, the last
    1,040 (520 shards) validated; `advtrain train` on 2 ranks (gloo) with 2 workers each for 2 epochs, every
    process under RLIMIT_NOFILE 1,024 and sampled. About 45 s on 2 cores."""
    work = tmp_path_factory.mktemp("rehearsal")
    return work, scale_rehearsal.rehearse(work, scale_rehearsal.parser().parse_args([]))


@pytest.mark.slow
def test_imagenet_shaped_rehearsal_on_two_ranks_under_ulimit_1024(rehearsal):
    work, f = rehearsal
    assert f["prepare_rc"] == 0 and f["train_rc"] == 0, f["output"]
    assert f["train_shards"] >= 1300 and f["val_shards"] >= 500 and f["nofile"] == 1024
    roles = f["roles"]
    # 2 ranks, and 2 workers each for both epochs: the same 4 processes (a worker made per epoch would be 8)
    assert {"launcher", "rank 0", "rank 1", "worker"} <= set(roles) and roles["worker"]["processes"] == 4, roles
    # A rank's own descriptors (libraries, gloo's sockets, MLflow's store on rank 0) and at most OPEN_SHARDS shards;
    # a worker inherits its rank's. A descriptor per shard touched came to 903 in a worker of this run.
    for role in ("rank 0", "rank 1", "worker"):
        assert roles[role]["fds"] <= 64, roles
    metrics = json.loads((work / "metrics/train/standard_rehearsal_seed0.json").read_text())
    assert len(metrics["epochs"]) == 2 and all(e["val_clean_acc"] is not None for e in metrics["epochs"])
    assert (work / "models/standard_rehearsal_seed0.pt").exists()


@pytest.mark.slow
def test_a_reader_reads_every_shard_under_a_descriptor_limit_far_below_their_number(rehearsal):
    work, _ = rehearsal
    folder = work / "data/prepared/rehearsal"
    code = textwrap.dedent("""
        import hashlib, os, resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        from advtrain.prepared import open_split
        data, meta = open_split(sys.argv[1], "train")
        reader, h = data.reader, hashlib.sha256()
        base = peak = len(os.listdir("/proc/self/fd"))
        for i in range(len(reader)):
            h.update(reader.raw(i).numpy().tobytes())
            peak = max(peak, len(os.listdir("/proc/self/fd")))
        buf, offsets = reader.raw_many(range(len(reader) - 1, -1, -1))  # backwards: every read opens a file
        last = buf[offsets[0]:offsets[1]].numpy().tobytes()
        assert last == reader.raw(len(reader) - 1).numpy().tobytes() and offsets[-1] == len(buf)
        images = reader.decode(range(len(reader)))
        print(len(meta["splits"]["train"]["shards"]), len(images), h.hexdigest(), peak - base)
    """)
    p = subprocess.run([sys.executable, "-c", code, str(folder)], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    shards, images, digest, extra = p.stdout.split()
    whole = hashlib.sha256(b"".join((folder / f"train-{k:05d}.bin").read_bytes() for k in range(int(shards))))
    assert int(shards) >= 1300 and int(images) == 2 * int(shards) and digest == whole.hexdigest()
    assert int(extra) <= OPEN_SHARDS


def small_loader(folder: Path, workers: int, seed: int = 5):
    data, _ = open_split(folder, "train", {"stream": {"workers": workers, "decode": "cpu"}})
    return StreamLoader(data.reader, torch.arange(320), 32, "cpu", 28, {"resized_crop": [0.35, 1], "flip": True},
                        seed, channels_last=True, workers=workers)


@pytest.mark.slow
def test_workers_persist_take_each_epochs_plan_and_never_reload_the_index(rehearsal, tmp_path):
    """The same worker processes read every epoch; the index, loaded and checked by the process that opened the
    split, is not read again by them (it is deleted before they start); batches equal crop_resize of the plan."""
    import shutil

    folder = tmp_path / "rehearsal"
    shutil.copytree(rehearsal[0] / "data/prepared/rehearsal", folder)
    loader = small_loader(folder, workers=2)
    (folder / "train.index.pt").unlink()
    start = loader.generator.get_state()
    epochs, pids = [], []
    for _ in range(2):
        epochs.append([(x.clone(), y.clone()) for x, y in loader])
        pids.append(sorted(w.pid for w in loader._loader._iterator._workers))
    assert pids[0] == pids[1] and len(pids[0]) == 2
    plan = small_loader(rehearsal[0] / "data/prepared/rehearsal", workers=0)
    plan.generator.set_state(start)
    for batches in epochs:
        order, box, flips = plan.plan()
        for k, (x, y) in enumerate(batches):
            p = slice(32 * k, 32 * (k + 1))
            rows = plan.rows[order[p]]
            assert torch.equal(x, crop_resize(plan.reader.decode(rows), box[p], flips[p], 28)), k
            assert torch.equal(y, plan.reader.labels[rows])


@pytest.mark.slow
def test_an_epoch_can_start_at_a_batch_without_reading_the_ones_before(rehearsal):
    folder = rehearsal[0] / "data/prepared/rehearsal"
    whole = small_loader(folder, workers=2)
    full = list(whole)
    part = small_loader(folder, workers=2)
    tail = list(part.batches(3))
    # the workers were given batches 3 on only: the first three were never read
    assert len(tail) == len(full) - 3 and [k for k, *_ in part._plan.items] == list(range(3, len(full)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))
    assert torch.equal(whole.generator.get_state(), part.generator.get_state())  # the next epoch is the same

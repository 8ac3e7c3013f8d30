"""Data-parallel training under torchrun with gloo on the CPU: 2 ranks compute what one process computes, only rank 0
writes, and a run whose rank is SIGKILLed resumes under torchrun to the uninterrupted run's weights."""
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIN, deep_update, env, make_project, run

# 2 epochs of PGD-AT and DEAT on 1,000 images of Fashion-MNIST in global batches of 100: 50 per rank. DEAT's gamma
# is low enough that its replay count grows in epoch 2, so the rule's agreement across ranks is exercised.
OVERRIDES = {
    "runs": {"methods": ["pgd", "deat"], "teacher_methods": [], "seeds": [0]},
    # fp32: the claim is about the sums, and bf16's rounding (on CPUs with bf16 units `auto` picks it) would be larger
    "datasets": {"fashionmnist": {"training": {"epochs": 2, "batch_size": 100, "train_subset": 1000, "val_points": 0,
                                               "select": "last", "device": "cpu", "precision": "fp32"}}},
    "methods": {"deat": {"fashionmnist": {"gamma": 0.5, "r_max": 3, "training": {"epochs": 2}}},
                "pgd": {"fashionmnist": {"steps": 3, "training": {"epochs": 2}}}},
}
METHODS = ("pgd", "deat")
# Float sums in another order (each rank averages its half, then the all-reduce) are the only difference from one
# process: ~1e-7 of a tensor's norm. PGD's sign steps amplify them (a near-zero input gradient can flip its sign):
# after 2 epochs of PGD-3, up to ~3e-4 of a tensor's norm, and of the gradient magnitude (a sum of |input gradient|
# over every attacked image, where each flip adds up) 5e-4 and 1.2e-3 in two runs. DEAT stays at ~1e-7.
TOLERANCE = 1e-3  # |a - b| / |a| per tensor, and the relative difference of each per-epoch metric
GRAD_TOLERANCE = 3e-3  # the epoch's gradient magnitude


def project(tmp: Path, name: str, devices: int, prepared_from: Path | None = None) -> Path:
    proj = make_project(tmp / name, deep_update(OVERRIDES, {"datasets": {"fashionmnist": {"training": {"devices": devices}}}}))
    if prepared_from is None:
        run([str(BIN / "advtrain"), "prepare", "fashionmnist"], proj)
    else:
        shutil.copytree(prepared_from / "data", proj / "data")
    return proj


def train(proj: Path, method: str, check: bool = True, fault: str | None = None):
    extra = {"ADVTRAIN_FAULT": fault, "ADVTRAIN_FAULT_RANK": "1"} if fault else {}
    return run([str(BIN / "advtrain"), "train", method, "fashionmnist"], proj, check=check, extra_env=extra)


def weights(proj: Path, method: str) -> dict:
    return torch.load(proj / f"models/{method}_fashionmnist_seed0.pt", weights_only=True)["model"]


def epochs(proj: Path, method: str) -> list[dict]:
    return json.loads((proj / f"metrics/train/{method}_fashionmnist_seed0.json").read_text())["epochs"]


def files(proj: Path) -> set[str]:
    skip = (".git", ".dvc", "workflow", "data", "mlruns")  # mlruns/: named by run ids
    return {str(p.relative_to(proj)) for p in proj.rglob("*") if p.is_file() and p.parts[len(proj.parts)] not in skip}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    one = project(tmp, "one", 1)
    two = project(tmp, "two", 2, prepared_from=one)
    out = {}
    for method in METHODS:
        train(one, method)
        out[method] = train(two, method).stdout
    return one, two, out


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_what_one_process_trains(runs, method):
    one, two, stdout = runs
    assert "torch.distributed.run --standalone --nproc-per-node=2" in stdout[method]  # relaunched by training.devices
    a, b = weights(one, method), weights(two, method)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= TOLERANCE * a[k].norm(), (method, k, (a[k] - b[k]).norm() / a[k].norm())
    e1, e2 = epochs(one, method), epochs(two, method)
    assert len(e1) == len(e2) == 2
    for m1, m2 in zip(e1, e2):
        for key in ("loss", "adv_acc", "grad_l1", "passes"):
            rel = GRAD_TOLERANCE if key == "grad_l1" else TOLERANCE
            assert m2[key] == pytest.approx(m1[key], rel=rel), (method, m1["epoch"], key)
        assert (m2["attack_steps"], m2["optimizer_steps"]) == (m1["attack_steps"], m1["optimizer_steps"])
    if method == "deat":
        assert [m["attack_steps"] for m in e1] == [1, 2]  # the rule raised the replay count after epoch 1
        # both ranks print each epoch's replay count: identical on both
        rank0 = re.findall(r"^\[deat_fashionmnist_seed0\] epoch (\d)/2 .* steps (\d+)", stdout[method], re.M)
        rank1 = re.findall(r"^\[rank 1\] \[deat_fashionmnist_seed0\] epoch (\d)/2 .* steps (\d+)", stdout[method], re.M)
        assert rank0 == rank1 == [("1", "1"), ("2", "2")]


def test_only_rank_0_writes_and_there_is_one_mlflow_run(runs):
    one, two, _ = runs
    # the same files as one process's (a second writer would leave its own temporary or log files), and one lock
    assert files(two) == files(one)
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{two / 'mlruns.db'}")
    exp = client.get_experiment_by_name("advtrain")
    for method in METHODS:
        found = client.search_runs([exp.experiment_id], f"tags.run = '{method}_fashionmnist_seed0'")
        assert len(found) == 1
        history = client.get_metric_history(found[0].info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2]


def test_a_killed_rank_resumes_under_torchrun_to_the_uninterrupted_weights(runs, tmp_path):
    _, two, _ = runs
    proj = project(tmp_path, "killed", 2, prepared_from=two)
    # rank 1 is SIGKILLed before its 5th minibatch of epoch 2 (10 minibatches per epoch); torchrun stops rank 0
    p = train(proj, "deat", check=False, fault="train.batch:15")
    assert p.returncode != 0
    assert "[fault] SIGKILL at train.batch" in p.stdout
    assert not (proj / "models/deat_fashionmnist_seed0.pt").exists()
    p = train(proj, "deat")
    assert "resuming after epoch 1/2" in p.stdout
    a, b = weights(two, "deat"), weights(proj, "deat")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timing = ("seconds", "images_per_s")
    assert ([{k: v for k, v in m.items() if k not in timing} for m in epochs(proj, "deat")]
            == [{k: v for k, v in m.items() if k not in timing} for m in epochs(two, "deat")])


def test_sigterm_to_every_rank_stops_them_at_one_minibatch_and_the_run_resumes_there(runs, tmp_path):
    """SLURM signals every process of a job step: torchrun and both ranks get SIGTERM. The ranks agree on the
    minibatch to stop after, rank 0 writes the checkpoint, and the rerun ends with the uninterrupted weights."""
    _, two, _ = runs
    proj = project(tmp_path, "sigterm", 2, prepared_from=two)
    proc = subprocess.Popen([str(BIN / "advtrain"), "train", "deat", "fashionmnist"], cwd=proj,
                            env={**env(), "ADVTRAIN_DELAY": "train.batch=0.3"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[deat_fashionmnist_seed0] epoch 2/2  batch 2/10"):
            os.killpg(proc.pid, signal.SIGTERM)
    out = "".join(lines)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM  # a failure Snakemake's retries resubmit
    assert "SIGTERM stopped the 2 ranks; the same command resumes in epoch 2 after batch 8" in out, out[-3000:]
    stops = re.findall(r"SIGTERM: in epoch 2/2 after batch (\d+)/10: checkpoint written", out)
    assert len(stops) == 1, out[-4000:]  # one line, from rank 0
    state = torch.load(next((proj / "checkpoints/deat_fashionmnist_seed0").glob("*.pt")), weights_only=True)
    assert state["epoch"] == 1 and state["in_epoch"]["batch"] == int(stops[0]) == 8  # the ranks' first agreement
    p = train(proj, "deat")
    assert "resuming in epoch 2/2 after batch 8/10" in p.stdout
    a, b = weights(two, "deat"), weights(proj, "deat")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_batchnorm_model_resumed_inside_an_epoch_on_two_ranks_ends_bit_for_bit(runs, tmp_path):
    """Each rank's BatchNorm statistics (its own shard's) go into the checkpoint and come back to that rank: PGD's
    eval-mode attacks after the resume use them, as they did in the uninterrupted run."""
    _, two, _ = runs
    bn = {"datasets": {"fashionmnist": {"model": "wide_resnet", "training": {"checkpoint_minutes": 1e-9}}},
          "models": {"wide_resnet": {"depth": 10, "width": 1}}}
    whole, killed = (project(tmp_path, name, 2, prepared_from=two) for name in ("bn_whole", "bn_killed"))
    for proj in (whole, killed):
        (proj / "bn.yaml").write_text(json.dumps(bn))
    cmd = [str(BIN / "advtrain"), "--params", "params.yaml,bn.yaml", "train", "pgd", "fashionmnist"]
    run(cmd, whole)
    # rank 1 is SIGKILLed before minibatch 9 of epoch 2; the ranks' last agreement wrote a checkpoint after batch 8
    p = run(cmd, killed, check=False, extra_env={"ADVTRAIN_FAULT": "train.batch:19", "ADVTRAIN_FAULT_RANK": "1"})
    assert p.returncode != 0
    p = run(cmd, killed)
    assert "resuming in epoch 2/2 after batch 8/10" in p.stdout, p.stdout[-3000:]
    a, b = weights(whole, "pgd"), weights(killed, "pgd")
    assert any("running_mean" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

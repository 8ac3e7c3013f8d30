"""Fault injection: the real `advtrain` process is SIGKILLed at chosen points of training and evaluation (see
src/advtrain/faults.py), files are corrupted or truncated, a NaN is injected into the loss, the tracking store is
unreachable. Each fault survived means: the rerun (the same command) completes, and ends exactly where an
uninterrupted run ends (same weights, same per-epoch metrics, same evaluation), with every epoch in MLflow once."""
import json
import re
import signal
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from advtrain import paths
from advtrain.config import Params
from advtrain.prepared import data_digest
from conftest import BIN, env, make_project, run

OVERRIDES = {
    "runs": {"methods": ["pgd"], "teacher_methods": [], "seeds": [0]},
    "datasets": {"fashionmnist": {
        # 10 batches per epoch (no validation split)
        "training": {"epochs": 3, "batch_size": 100, "train_subset": 1000, "val_points": 0, "select": "last"},
        "evaluation": {"n_points": 100, "batch_size": 20, "pgd_steps": 5, "cw_steps": 5, "autoattack": "fast"}}},
    "methods": {"pgd": {"fashionmnist": {"steps": 2}}},
}
MODEL, METRICS = "models/pgd_fashionmnist_seed0.pt", "metrics/train/pgd_fashionmnist_seed0.json"
RESULT = "results/seeds/pgd_fashionmnist/seed0.json"



def checkpoint(proj) -> Path:
    """The training checkpoint of the run's settings: one slot per fingerprint in checkpoints/pgd_fashionmnist/."""
    return proj / paths.checkpoint_path("pgd_fashionmnist_seed0", fingerprint(proj))


def fingerprint(proj) -> str:
    """The run's settings and its prepared training split, as the trainer keys its checkpoint."""
    cfg = Params.load(proj / "params.yaml").resolve("pgd", "fashionmnist")
    cfg.data_digest = data_digest(json.loads((proj / "data/prepared/fashionmnist/meta.json").read_text()), "train")
    return cfg.train_fingerprint()


TIMING = ("seconds", "images_per_s", "eval_seconds", "seconds_per_attack", "versions", "mlflow_run_key")  # per run


def advtrain(proj, *args, fault: str | None = None, extra_env: dict | None = None):
    e = env()
    if fault:
        e["ADVTRAIN_FAULT"] = fault
    e.update(extra_env or {})
    return subprocess.run([str(BIN / "advtrain"), *args], cwd=proj, env=e, capture_output=True, text=True, timeout=600)


def untimed(obj):
    """A record without its wall-clock fields (the only thing a rerun may change)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def weights(proj):
    return torch.load(proj / MODEL, weights_only=True)["model"]


def epochs_in_mlflow(proj, name="pgd_fashionmnist_seed0"):
    client = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    exp = client.get_experiment_by_name("advtrain")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("run") == name]
    assert len(runs) == 1, [r.info.run_id for r in runs]  # a resumed run logs into the same MLflow run
    return runs[0], sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("faults_base"), OVERRIDES)
    run([str(BIN / "advtrain"), "prepare", "fashionmnist"], proj)
    return proj


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The uninterrupted run every faulted one must match."""
    proj = tmp_path_factory.mktemp("faults_ref") / "p"
    shutil.copytree(base, proj)
    run([str(BIN / "advtrain"), "train", "pgd", "fashionmnist"], proj)
    run([str(BIN / "advtrain"), "evaluate", "pgd", "fashionmnist"], proj)
    return {"weights": weights(proj), "model_file": (proj / MODEL).read_bytes(),
            "metrics": untimed(json.loads((proj / METRICS).read_text())["epochs"]),
            "result": untimed(json.loads((proj / RESULT).read_text()))}


def fresh(base, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(base, proj)
    return proj


def assert_same_training(proj, reference):
    for k, v in reference["weights"].items():
        assert torch.equal(weights(proj)[k], v), k
    assert untimed(json.loads((proj / METRICS).read_text())["epochs"]) == reference["metrics"]
    _, steps = epochs_in_mlflow(proj)
    assert steps == [1, 2, 3]  # every epoch logged, none twice


# Each sequence: the same command killed again and again, each time at another point (counts are per process), then
# run to the end; the result must be the uninterrupted run's. 10 batches per epoch; {ckpt} is the checkpoint's file
# (written at the start and after every epoch), pgd_fashionmnist_seed0.pt the model file.
TRAINING_KILLS = {
    "in epoch 1 (before any epoch completed), after epoch 2's checkpoint before its logging, while publishing the "
    "model file": [("train.batch:5", 0), ("train.epoch_end:2", 2), ("write@pgd_fashionmnist_seed0.pt:1", 3)],
    "in epoch 2, while publishing epoch 3's checkpoint": [("train.batch:15", 1), ("write@{ckpt}:2", 2)],
}


@pytest.mark.parametrize("kills", TRAINING_KILLS.values(), ids=TRAINING_KILLS.keys())
def test_training_killed_then_rerun_ends_as_if_never_killed(kills, base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    for fault, epoch_kept in kills:
        fault = fault.format(ckpt=f"{fingerprint(proj)}.pt")
        p = advtrain(proj, "train", "pgd", "fashionmnist", fault=fault)
        assert p.returncode == -9, (fault, p.returncode, p.stdout[-2000:], p.stderr[-2000:])  # really SIGKILLed
        assert not (proj / MODEL).exists() and not (proj / METRICS).exists()  # no output a later stage could take
        # the checkpoint the kill left is a whole one, of the last completed epoch
        assert torch.load(checkpoint(proj), weights_only=True)["epoch"] == epoch_kept, fault
    p = advtrain(proj, "train", "pgd", "fashionmnist")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_training(proj, reference)
    # the same weights give the same bytes (no wall-clock time in the model file), so DVC re-evaluates nothing
    assert (proj / MODEL).read_bytes() == reference["model_file"]


def test_training_killed_under_snakemake_resumes_with_the_same_command(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    cmd = [str(BIN / "snakemake"), "--cores", "2", MODEL]  # OMP_NUM_THREADS=2, as the reference ran
    e = env()
    e["ADVTRAIN_FAULT"] = "train.batch:25"
    p = subprocess.run(cmd, cwd=proj, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and checkpoint(proj).exists() and not (proj / MODEL).exists()
    p = run(cmd, proj)
    assert "resuming after epoch 2/3" in p.stdout + p.stderr
    assert_same_training(proj, reference)


def test_a_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    p = advtrain(proj, "train", "pgd", "fashionmnist", fault="train.nan:15")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "NaN/inf at epoch 2, optimizer step 5/10" in err, err
    assert "last good checkpoint (epoch 1)" in err
    assert torch.load(checkpoint(proj), weights_only=True)["epoch"] == 1
    assert not (proj / MODEL).exists()
    assert epochs_in_mlflow(proj)[0].info.status == "FAILED"
    p = advtrain(proj, "train", "pgd", "fashionmnist")  # the fault was transient: the rerun resumes after epoch 1
    assert p.returncode == 0 and "resuming after epoch 1/3" in p.stdout
    assert_same_training(proj, reference)
    assert epochs_in_mlflow(proj)[0].info.status == "FINISHED"


def test_a_corrupt_training_checkpoint_is_replaced_by_a_fresh_run(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    assert advtrain(proj, "train", "pgd", "fashionmnist", fault="train.batch:25").returncode == -9
    data = checkpoint(proj).read_bytes()
    checkpoint(proj).write_bytes(data[: len(data) // 3])  # a disk that lost the tail of the file
    p = advtrain(proj, "train", "pgd", "fashionmnist")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "not a readable training checkpoint" in p.stdout and "resuming" not in p.stdout
    for k, v in reference["weights"].items():
        assert torch.equal(weights(proj)[k], v), k


def test_a_truncated_dataset_file_is_refused_then_prepare_mends_it(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    test_pt = proj / "data/prepared/fashionmnist/test.pt"
    assert advtrain(proj, "train", "pgd", "fashionmnist").returncode == 0
    test_pt.write_bytes(test_pt.read_bytes()[:5000])
    p = advtrain(proj, "evaluate", "pgd", "fashionmnist")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "test.pt: corrupt" in p.stderr
    assert (proj / MODEL).exists()  # the trained model is untouched
    assert advtrain(proj, "prepare", "fashionmnist").returncode == 0
    assert advtrain(proj, "evaluate", "pgd", "fashionmnist").returncode == 0
    assert untimed(json.loads((proj / RESULT).read_text())) == reference["result"]


def test_a_model_file_from_another_method_or_truncated_gives_one_line(base, tmp_path):
    proj = fresh(base, tmp_path)
    assert advtrain(proj, "train", "pgd", "fashionmnist").returncode == 0
    shutil.copy(proj / MODEL, proj / "models/fgsm_fashionmnist_seed0.pt")
    p = advtrain(proj, "evaluate", "fgsm", "fashionmnist")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "was trained with method='pgd', but 'fgsm' is expected" in p.stderr
    data = (proj / MODEL).read_bytes()
    (proj / MODEL).write_bytes(data[:2000])
    p = advtrain(proj, "evaluate", "pgd", "fashionmnist")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "truncated or corrupt" in p.stderr


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    proj = tmp_path_factory.mktemp("faults_trained") / "p"
    shutil.copytree(base, proj)
    run([str(BIN / "advtrain"), "train", "pgd", "fashionmnist"], proj)
    return proj


# 100 points, about 55 classified correctly, in batches of 20: 3 batches each of PGD, CW, APGD-CE, then APGD-T.
# Killed in PGD; then (resumed) in APGD-CE; then while publishing the result; then run to the end.
EVAL_KILLS = [("evaluate.batch:2", "pgd-5 #1: batch 2/"), ("evaluate.batch:5", "] apgd-"),
              ("write@seed0.json:1", "robust accuracy after apgd-t")]


def test_evaluation_killed_then_rerun_finishes_from_its_state_with_the_same_result(trained, reference, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(trained, proj)
    for i, (fault, last_line) in enumerate(EVAL_KILLS):
        p = advtrain(proj, "evaluate", "pgd", "fashionmnist", fault=fault)
        assert p.returncode == -9, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
        assert last_line in p.stdout.strip().splitlines()[-2], p.stdout[-1000:]  # killed where intended
        assert ("resuming from checkpoints/eval/pgd_fashionmnist_seed0/" in p.stdout) == (i > 0)
        assert not (proj / RESULT).exists()
    p = advtrain(proj, "evaluate", "pgd", "fashionmnist")
    assert p.returncode == 0, p.stderr[-2000:]
    # killed while publishing: the finished evaluation was kept, and is published without attacking again
    assert "evaluated with these settings before: publishing that result" in p.stdout
    assert untimed(json.loads((proj / RESULT).read_text())) == reference["result"]
    assert not list((proj / "checkpoints/eval/pgd_fashionmnist_seed0").glob("*.pt"))  # the state goes once finished


def test_an_unreachable_tracking_store_warns_once_and_the_run_is_synced_later(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    down = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing listens on the discard port
    p = advtrain(proj, "train", "pgd", "fashionmnist", extra_env=down)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("warning: MLflow tracking at http://127.0.0.1:9 failed") == 1, p.stdout
    assert untimed(json.loads((proj / METRICS).read_text())["epochs"]) == reference["metrics"]  # the local record
    assert advtrain(proj, "evaluate", "pgd", "fashionmnist", extra_env=down).returncode == 0
    assert not (proj / "mlruns.db").exists()
    p = advtrain(proj, "sync", "pgd", "fashionmnist")  # the default store, reachable now
    assert p.returncode == 0, p.stderr[-2000:]
    run_, steps = epochs_in_mlflow(proj)
    assert steps == [1, 2, 3]
    client = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    losses = [m.value for m in sorted(client.get_metric_history(run_.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert losses == [e["loss"] for e in reference["metrics"]]
    assert run_.data.metrics["eval_robust_acc"] == reference["result"]["robust_acc"]
    # the model the store missed is logged and registered, and evaluation's alias set on it
    evaluated = client.get_model_version_by_alias("advtrain-pgd-fashionmnist", "evaluated")
    assert evaluated.run_id == run_.info.run_id
    assert evaluated.tags["robust_acc"] == f"{run_.data.metrics['eval_robust_acc']:.6g}"
    assert advtrain(proj, "sync", "pgd", "fashionmnist").returncode == 0  # twice is harmless: nothing logged twice
    assert epochs_in_mlflow(proj)[1] == [1, 2, 3]
    assert len(client.search_model_versions("name = 'advtrain-pgd-fashionmnist'")) == 1


# --- checkpoints inside an epoch (src/advtrain/preemption.py) ---------------------------------------------------------
EVERY_BATCH = {"datasets": {"fashionmnist": {"training": {"checkpoint_minutes": 1e-9}}}}  # not in the fingerprint


def with_settings(proj, overlay: dict) -> list[str]:
    (proj / "overlay.yaml").write_text(json.dumps(overlay))
    return ["--params", "params.yaml,overlay.yaml"]


def test_a_kill_inside_an_epoch_loses_only_the_batch_in_flight(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    settings = with_settings(proj, EVERY_BATCH)
    p = advtrain(proj, *settings, "train", "pgd", "fashionmnist", fault="train.batch:15")  # epoch 2, its 5th batch
    assert p.returncode == -9, p.stderr[-2000:]
    state = torch.load(checkpoint(proj), weights_only=True)
    assert state["epoch"] == 1 and state["in_epoch"]["batch"] == 4
    p = advtrain(proj, *settings, "train", "pgd", "fashionmnist")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming in epoch 2/3 after batch 4/10" in p.stdout, p.stdout
    assert_same_training(proj, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_writes_a_checkpoint_at_the_next_batch_and_exits_for_a_retry(signum, base, reference, tmp_path):
    """SLURM's time limit (SIGTERM) or its --signal warning (SIGUSR1): the run stops within a batch, with its place
    saved, and an exit status a retry takes up; the same command then ends as an uninterrupted run."""
    proj = fresh(base, tmp_path)
    e = {**env(), "ADVTRAIN_DELAY": "train.batch=0.2"}
    proc = subprocess.Popen([str(BIN / "advtrain"), "train", "pgd", "fashionmnist"], cwd=proj, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 2/3  batch 4/10" in line:
            proc.send_signal(signum)
    out = "".join(lines)
    assert proc.wait(timeout=120) == 128 + signum, out[-3000:]
    name = signal.Signals(signum).name
    stop = re.search(rf"{name}: in epoch 2/3 after batch (\d+)/10: checkpoint written to .*; the same command "
                     "resumes from there", out)
    assert stop and "Traceback" not in out, out[-3000:]
    state = torch.load(checkpoint(proj), weights_only=True)
    assert state["epoch"] == 1 and state["in_epoch"]["batch"] == int(stop.group(1)) >= 4
    assert epochs_in_mlflow(proj)[0].info.status == "KILLED"
    p = advtrain(proj, "train", "pgd", "fashionmnist")
    assert p.returncode == 0 and f"resuming in epoch 2/3 after batch {stop.group(1)}/10" in p.stdout
    assert_same_training(proj, reference)


def test_a_nan_inside_an_epoch_never_overwrites_the_last_good_checkpoint(base, reference, tmp_path):
    proj = fresh(base, tmp_path)
    settings = with_settings(proj, EVERY_BATCH)
    p = advtrain(proj, *settings, "train", "pgd", "fashionmnist", fault="train.nan:15")  # epoch 2, its 5th step
    assert p.returncode == 2 and "NaN/inf at epoch 2, optimizer step 5/5" in p.stderr, p.stderr[-2000:]
    state = torch.load(checkpoint(proj), weights_only=True)
    assert state["epoch"] == 1 and state["in_epoch"]["batch"] == 4  # written before the NaN, not after it
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    p = advtrain(proj, *settings, "train", "pgd", "fashionmnist")  # a transient fault: the rerun goes on from there
    assert p.returncode == 0 and "resuming in epoch 2/3 after batch 4/10" in p.stdout
    assert_same_training(proj, reference)

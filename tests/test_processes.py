"""What a process leaves for the others: a refused or killed `advtrain` never truncates another's log, checkpoint or
MLflow store; its own temporary files do not outlive it."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import BIN, ROOT, deep_update, env, make_project, run
from imagefolder_data import make_image_folder

LOG = "logs/train/pgd_fashionmnist_seed0.log"


def with_settings(prepared: Path, dest: Path, overrides: dict) -> Path:
    """A copy of the session's prepared project with `overrides` merged into its params.yaml."""
    proj = shutil.copytree(prepared, dest)
    params = deep_update(yaml.safe_load((proj / "params.yaml").read_text()), overrides)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def wait_for(predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.2)
    assert predicate()


# a long PGD-AT run (2,000 images, 50 epochs) that the tests stop themselves
LONG = {"runs": {"methods": ["pgd"], "teacher_methods": [], "seeds": [0]},
        "datasets": {"fashionmnist": {"training": {"epochs": 50, "train_subset": 2000, "val_points": 0,
                                                   "select": "last"}}}}


def test_a_refused_second_run_and_a_kill_leave_the_first_ones_log_whole(prepared, tmp_path):
    proj = with_settings(prepared, tmp_path / "p", LONG)
    cmd = [str(BIN / "advtrain"), "--log", LOG, "train", "pgd", "fashionmnist"]
    first = subprocess.Popen(cmd, cwd=proj, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = proj / LOG
        wait_for(lambda: log.exists() and "epoch 1/50  loss" in log.read_text())
        before = log.read_text()
        second = run(cmd, proj, check=False)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"another advtrain process (pid {first.pid})" in second.stderr
        after = log.read_text()
        assert after.startswith(before), (before, after)  # nothing of the first run's log is lost
        assert first.poll() is None  # the first one goes on
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        assert log.read_text().startswith(before)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_the_overfitting_guard_decides_alike_on_ranks_with_batchnorm(tmp_path):
    """2 gloo ranks train FGSM-RS on a BatchNorm network: each rank normalises its own shard, so their held-out PGD
    accuracies differ; the guard must still take one decision (roll back or not) on every rank, so that the ranks'
    weights stay the same."""
    out = tmp_path / "out"
    out.mkdir()
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(Path(__file__).with_name("bn_ranks.py")), str(out)], tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert any(h["overfit"] for h in ranks[0]["history"]), ranks  # the guard fired (and rolled back)
    assert ranks[0]["history"] == ranks[1]["history"], ranks
    assert ranks[0]["params"] == ranks[1]["params"], ranks


def imagefolder_project(tmp: Path, overrides: dict) -> Path:
    """A project of 96 training images (32 held out) in 4 classes: a source whose size only `prepare` knows."""
    overlay = yaml.safe_load((ROOT / "tests/configs/imagefolder.yaml").read_text())
    proj = make_project(tmp, deep_update(overlay, overrides))
    make_image_folder(proj / "data/raw/shapes", n_train=96, n_test=16)
    run([str(BIN / "advtrain"), "prepare", "shapes"], proj)
    return proj


def test_a_last_minibatch_smaller_than_the_ranks_is_refused_once_in_one_line(tmp_path):
    # 65 training images, 32 held out: 33 in batches of 32 leave a last minibatch of 1 for 2 ranks
    proj = imagefolder_project(tmp_path / "p", {"runs": {"methods": ["pgd"]}, "datasets": {"shapes": {
        "training": {"devices": 2, "train_subset": 65}}}})
    assert run([str(BIN / "advtrain"), "check"], proj).returncode == 0  # the folder's size is not known to check
    p = run([str(BIN / "advtrain"), "train", "pgd", "shapes"], proj, check=False)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert "ChildFailedError" not in p.stdout + p.stderr and "Traceback" not in p.stdout + p.stderr, p.stderr
    err = p.stderr.strip().splitlines()
    assert err == ["error: pgd_shapes_seed0: the last minibatch holds 1 images, fewer than the 2 ranks: change "
                   "training.batch_size or training.train_subset"], p.stderr


def test_a_killed_rank_is_named_in_one_line_and_the_same_command_resumes(prepared, tmp_path):
    proj = with_settings(prepared, tmp_path / "p", {
        "runs": {"methods": ["pgd"], "teacher_methods": [], "seeds": [0]},
        "datasets": {"fashionmnist": {"training": {"epochs": 2, "batch_size": 100, "train_subset": 1000,
                                                   "val_points": 0, "select": "last", "devices": 2}}},
        "methods": {"pgd": {"fashionmnist": {"steps": 1}}}})
    cmd = [str(BIN / "advtrain"), "train", "pgd", "fashionmnist"]
    # rank 1 is SIGKILLed before its 5th minibatch of epoch 2 (10 per epoch)
    p = run(cmd, proj, check=False, extra_env={"ADVTRAIN_FAULT": "train.batch:15", "ADVTRAIN_FAULT_RANK": "1"})
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "[fault] SIGKILL at train.batch" in p.stdout, out[-3000:]
    assert "ChildFailedError" not in out and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], out[-3000:]
    assert re.fullmatch(r"error: pgd_fashionmnist_seed0: rank 1 of 2 \(pid \d+\) was killed by SIGKILL; the same "
                        r"command resumes after epoch 1", errors[0]), errors
    p = run(cmd, proj)
    assert "resuming after epoch 1/2" in p.stdout, p.stdout[-2000:]


def test_a_store_set_up_removes_the_temporary_stores_of_killed_processes(tmp_path, monkeypatch):
    """A process killed while it made the MLflow store leaves .mlruns.db.PID.tmp and its sqlite journal; the next
    set-up of that store removes those of dead processes and leaves a live one's."""
    from advtrain.tracking import open_client

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".mlruns.db.{dead.pid}.tmp", tmp_path / f".mlruns.db.{dead.pid}.tmp-journal"]
        kept = tmp_path / f".mlruns.db.{alive.pid}.tmp"
        for f in (*stale, kept):
            f.write_bytes(b"half a store")
        monkeypatch.chdir(tmp_path)
        open_client("sqlite:///mlruns.db")
        assert (tmp_path / "mlruns.db").exists()
        assert not any(f.exists() for f in stale) and kept.exists()
    finally:
        alive.kill()
        alive.wait()

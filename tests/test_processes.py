"""What a process leaves for the others: a refused or killed `advtrain` never truncates another's log, checkpoint or
MLflow store; its own temporary files do not outlive it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import BIN, deep_update, env, run

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

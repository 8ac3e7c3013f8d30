"""Evaluation across ranks (`evaluation.devices`): 2 gloo ranks under torchrun attack the batches one process makes,
split among them, and merge their per-point outcomes to one process's result; a rank SIGKILLed mid-evaluation
resumes from its own state to the same result; the setting is validated like `training.devices`."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from advtrain.config import ConfigError, Params
from conftest import BIN, ROOT, make_project, run
from test_faults import untimed

# A model trained for 2 epochs of PGD-AT at eps 0.05 (robust on about 40% of the points), evaluated on 24 points in
# batches of 6 with PGD-3, CW-3 and AutoAttack's fast version: about 3 batches per stage, rank 0 taking 2, rank 1 one.
OVERRIDES = {
    "runs": {"methods": ["pgd"], "teacher_methods": [], "seeds": [0]},
    "datasets": {"fashionmnist": {
        "eps": 0.05, "alpha": 0.0125,
        "training": {"epochs": 2, "batch_size": 100, "train_subset": 2000, "val_points": 0, "select": "last"},
        "evaluation": {"n_points": 24, "batch_size": 6, "pgd_steps": 3, "cw_steps": 3, "autoattack": "fast"}}},
    "methods": {"pgd": {"fashionmnist": {"steps": 2}}},
}
BATCH = 6
RESULT = "results/seeds/pgd_fashionmnist/seed0.json"
TWO_RANKS = {"datasets": {"fashionmnist": {"evaluation": {"devices": 2}}}}
EVALUATE = [str(BIN / "advtrain"), "--params", "params.yaml,ranks.yaml", "evaluate", "pgd", "fashionmnist"]


def copy(src: Path, dst: Path, overlay: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "ranks.yaml").write_text(json.dumps(overlay))
    return dst


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    proj = make_project(tmp_path_factory.mktemp("ranks") / "trained", OVERRIDES)
    shutil.copytree(prepared / "data", proj / "data")
    run([str(BIN / "advtrain"), "train", "pgd", "fashionmnist"], proj)
    return proj


@pytest.fixture(scope="module")
def evaluated(trained):
    """The same model evaluated by one process and by 2 ranks."""
    one = copy(trained, trained.parent / "one", {})
    two = copy(trained, trained.parent / "two", TWO_RANKS)
    run(EVALUATE, one)
    out = run(EVALUATE, two).stdout
    return one, two, out


def result(proj: Path) -> dict:
    return json.loads((proj / RESULT).read_text())


def test_two_ranks_give_one_process_s_per_point_outcomes(evaluated):
    one, two, out = evaluated
    assert "torch.distributed.run --standalone --nproc-per-node=2" in out  # relaunched by evaluation.devices
    a, b = result(one), result(two)
    assert "apgd-t" in a["autoattack"]["robust_acc_after"] and a["clean_acc"] > a["robust_acc"] > 0
    assert b["points"] == a["points"]  # every point's outcome under every attack
    assert untimed(b) == untimed(a)  # accuracies, after each stage, the example images, AutoAttack's warnings
    # both ranks attacked batches of every stage; rank 0 alone says what holds for all
    stages = ["pgd-3 #1", "cw-3 #1", "apgd-ce", "apgd-t"]
    for stage in stages:
        assert re.search(rf"^\[rank 1\] \[evaluate\] {re.escape(stage)}: batch \d+/", out, re.M), stage
        assert re.search(rf"^\[evaluate\] {re.escape(stage)}: batch \d+/", out, re.M), stage
    assert re.findall(r"^\[evaluate\] robust accuracy after (.+?): ", out, re.M) == stages
    assert "[rank 1] [evaluate] robust accuracy" not in out
    # rank 0 alone logged the result to MLflow, into the training's run, and wrote the record, and removed every
    # rank's state
    client = MlflowClient(f"sqlite:///{two / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("advtrain").experiment_id])
    assert [r.data.tags.get("run") for r in runs] == ["pgd_fashionmnist_seed0"]
    history = client.get_metric_history(runs[0].info.run_id, "eval_robust_acc")
    assert [m.value for m in history] == [b["robust_acc"]]
    assert not list((two / "checkpoints/eval/pgd_fashionmnist_seed0").glob("*.pt"))
    assert len(list((two / "checkpoints/eval/pgd_fashionmnist_seed0").glob("*.json"))) == 1


def test_a_rank_killed_mid_evaluation_resumes_from_its_own_state(evaluated, trained):
    one, _, _ = evaluated
    reference = result(one)
    proj = copy(trained, trained.parent / "killed", TWO_RANKS)
    states = proj / "checkpoints/eval/pgd_fashionmnist_seed0"
    # PGD, CW and APGD-CE each attack the clean-correct points, in batches of 6: batch i is rank i % 2's
    batches = math.ceil(round(reference["clean_acc"] * reference["n_points"]) / BATCH)
    assert batches >= 3  # rank 0 has 2 batches of a stage or more, rank 1 one or more
    # 1. rank 1 is killed after its last PGD batch
    mine = batches // 2
    p = run(EVALUATE, proj, check=False,
            extra_env={"ADVTRAIN_FAULT": f"evaluate.batch@pgd-3 #1:{mine}", "ADVTRAIN_FAULT_RANK": "1"})
    assert p.returncode == 2, (p.returncode, p.stdout[-3000:], p.stderr[-3000:])
    assert "[fault] SIGKILL at evaluate.batch pgd-3 #1" in p.stdout
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and re.fullmatch(
        r"error: pgd_fashionmnist_seed0: rank 1 of 2 \(pid \d+\) was killed by SIGKILL; the same command resumes "
        r"its 2 ranks from their saved batches", err), err
    assert not (proj / RESULT).exists()
    assert sorted(p.name[16:] for p in states.glob("*.pt")) == [".pt", ".rank1.pt"]  # rank 0's, rank 1's
    # 2. rank 1 resumes after its PGD batches (none left: it goes to the merge), then is killed after its last CW
    # batch; its state then is what a kill between CW's merge and its saving leaves: kept aside for step 4
    p = run(EVALUATE, proj, check=False,
            extra_env={"ADVTRAIN_FAULT": f"evaluate.batch@cw-3 #1:{mine}", "ADVTRAIN_FAULT_RANK": "1"})
    assert p.returncode == 2, (p.stdout[-3000:], p.stderr[-3000:])
    assert re.search(rf"^\[rank 1\] \[evaluate\] resuming from .*\.rank1\.pt: 0/4 attacks and {mine} batches "
                     "already done", p.stdout, re.M), p.stdout[-3000:]
    assert not re.search(r"^\[rank 1\] \[evaluate\] pgd-3 #1: batch", p.stdout, re.M)
    rank1 = next(states.glob("*.rank1.pt"))
    behind = rank1.read_bytes()
    # 3. rank 0 is killed after its first APGD-CE batch, with its others left
    p = run(EVALUATE, proj, check=False,
            extra_env={"ADVTRAIN_FAULT": "evaluate.batch@apgd-ce:1", "ADVTRAIN_FAULT_RANK": "0"})
    assert p.returncode == 2 and "rank 0 of 2" in p.stderr, (p.stdout[-3000:], p.stderr[-3000:])
    # 4. rank 1 as if killed after CW's merge, before it saved CW as done: it takes rank 0's merged outcome; the
    # same command ends with the uninterrupted result, rank 0 attacking only the APGD-CE batches it had left
    rank1.write_bytes(behind)
    p = run(EVALUATE, proj)
    assert re.search(r"^\[evaluate\] resuming from .*[0-9a-f]\.pt: 2/4 attacks and \d+ batches already done",
                     p.stdout, re.M), p.stdout[-3000:]
    assert ("[rank 1] [evaluate] the other ranks saved cw-3 #1 as merged after this rank was stopped: taking their "
            "outcome") in p.stdout
    assert re.search(r"^\[rank 1\] \[evaluate\] resuming from .*: 2/4 attacks", p.stdout, re.M)
    rank0 = re.findall(r"^\[evaluate\] apgd-ce: batch (\d+)/", p.stdout, re.M)
    assert rank0 == [str(b) for b in range(3, batches + 1, 2)], p.stdout[-3000:]
    assert re.findall(r"^\[rank 1\] \[evaluate\] apgd-ce: batch (\d+)/", p.stdout, re.M) == \
        [str(b) for b in range(2, batches + 1, 2)]
    assert untimed(result(proj)) == untimed(reference)
    assert not list(states.glob("*.pt"))


def test_a_state_of_another_number_of_ranks_is_not_resumed(tmp_path):
    """Another number of ranks splits the batches otherwise: a saved state is ignored, with a line that says so."""
    from advtrain.evaluate import load_state
    from advtrain.io import save_torch

    path = tmp_path / "state.pt"
    save_torch(path, {"key": "k", "world": 2, "done": []})
    lines = []
    assert load_state(path, "k", lines.append, 2) is not None
    assert load_state(path, "k", lines.append, 1) is None
    assert lines == [f"[evaluate] {path} was saved by an evaluation on 2 rank(s), this one runs on 1; evaluating "
                     "afresh"]
    save_torch(path, {"key": "k", "done": []})  # a state saved before evaluation.devices: one process's
    assert load_state(path, "k", lines.append, 1) is not None and load_state(path, "k", lines.append, 2) is None


def params_with(devices) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"]["fashionmnist"]["evaluation"]["devices"] = devices
    return raw


@pytest.mark.parametrize("devices", [0, 1.5, "2", True])
def test_evaluation_devices_is_validated_in_one_line(devices):
    with pytest.raises(ConfigError) as e:
        Params(params_with(devices)).resolve("pgd", "fashionmnist")
    msg = str(e.value)
    assert "\n" not in msg and "datasets.fashionmnist.evaluation.devices must be an integer >= 1" in msg, msg


def test_evaluation_devices_changes_no_result_key(trained):
    """The result key (the record a rerun re-publishes) is the same on any number of ranks; the default is 1."""
    from advtrain.evaluate import fingerprint

    one, two = (Params(params_with(d)).resolve("pgd", "fashionmnist") for d in (1, 2))
    assert Params(yaml.safe_load((ROOT / "params.yaml").read_text())).resolve(
        "pgd", "fashionmnist").evaluation["devices"] == 1
    model = trained / "models/pgd_fashionmnist_seed0.pt"
    assert fingerprint(model, one.eps, one.evaluation, 0, 24) == fingerprint(model, two.eps, two.evaluation, 0, 24)

"""Nothing lost, part two: bad values never cost finished work, outputs are byte-stable, DVC experiments compare.

One finished tiny project (PGD-AT, and DYNAT with its teacher) is shared by the module's tests, in file order: a no-op
rerun of every stage, invalid params.yaml files thrown at the real `snakemake` and `dvc repro`, a valid value that
fails (lr = 1e30: NaN) and its revert, DVC experiments. Every test leaves it as it found it. It is built by Snakemake
and committed to DVC (`dvc commit`), so that both front ends know its outputs as their own."""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from advtrain import cli, io
from advtrain.config import ConfigError, Params
from advtrain.errors import UserError
from conftest import BIN, ROOT, env, make_project, run
from test_params_property import PATHS, values

OVERRIDES = {
    "runs": {"methods": ["pgd"], "teacher_methods": ["dynat"], "seeds": [0]},
    "datasets": {"fashionmnist": {"training": {"epochs": 2, "train_subset": 1000},
                                  "evaluation": {"n_points": 50, "pgd_steps": 3, "cw_steps": 0}}},
    "methods": {"pgd": {"fashionmnist": {"steps": 2, "evaluation": {"autoattack": "off"}}},
                "dynat": {"fashionmnist": {"steps": 2, "teacher_epochs": 1, "check_points": 100,
                                           "evaluation": {"autoattack": "off"}}}},
}
OUTPUTS = ("data/prepared", "models", "metrics", "results", "reports")


def digests(proj: Path) -> dict[str, str]:
    """sha256 of every output file of every stage."""
    return {str(p.relative_to(proj)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in OUTPUTS for p in sorted((proj / d).rglob("*")) if p.is_file() and p.name != ".gitignore"}


def tool(proj: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=proj, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def trained(text: str) -> bool:
    """Whether a training log shows an epoch being trained (not a finished checkpoint being published)."""
    return re.search(r"\] epoch \d+/\d+\s+(batch|loss)", text) is not None


def our_error_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    proj = make_project(tmp_path_factory.mktemp("nothing_lost") / "p", OVERRIDES)
    run([str(BIN / "snakemake"), "--cores", "2"], proj)
    run([str(BIN / "advtrain"), "check", "--out", "logs/check/params.valid"], proj)  # what dvc.yaml's check writes
    run([str(BIN / "dvc"), "commit", "-f"], proj)  # DVC records the outputs Snakemake made as its own
    assert "up to date" in run([str(BIN / "dvc"), "status"], proj).stdout
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "finished run"], proj)
    return proj


def test_a_no_op_rerun_of_every_stage_changes_no_byte_and_dvc_stays_clean(finished, monkeypatch, capsys):
    before = digests(finished)
    assert len(before) >= 12 and "models/teachers/dynat_fashionmnist_seed0.pt" in before
    monkeypatch.chdir(finished)  # the stages run in this process: the same code as the command, without start-up
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # as the commands ran: the project's mlruns.db
    for stage in (["prepare", "fashionmnist"], ["pretrain", "dynat", "fashionmnist"], ["train", "pgd", "fashionmnist"],
                  ["train", "dynat", "fashionmnist"], ["evaluate", "pgd", "fashionmnist"],
                  ["evaluate", "dynat", "fashionmnist"], ["aggregate", "pgd", "fashionmnist"],
                  ["aggregate", "dynat", "fashionmnist"], ["report"]):
        assert cli.main(stage) == 0, (stage, capsys.readouterr())
        assert not trained(capsys.readouterr().out), stage  # republished, not retrained
    assert digests(finished) == before
    assert "up to date" in tool(finished, "dvc", "status").stdout


# An invalid params.yaml, after a finished run: both front ends refuse it before scheduling anything (Snakemake when
# the Snakefile loads, DVC in its `check` stage, which every other stage comes after), in one line, touching nothing.
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), value=values)
@example(path=("runs", "methods"), value=["pgdd"])  # an unknown method ("Nothing to be done" before)
@example(path=("runs", "datasets"), value=None)  # DVC: "failed to resolve 'stages.prepare.foreach'"
@example(path=("datasets", "fashionmnist", "training", "train_subset"), value=50)  # dynat: no training image left
def test_invalid_params_are_refused_by_snakemake_and_dvc_before_anything_is_touched(finished, path, value):
    valid_text = (finished / "params.yaml").read_text()
    mutated = yaml.safe_load(valid_text)
    node = mutated
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    try:
        Params(mutated)
        assume(False)  # only invalid values here
    except ConfigError:
        pass
    before = digests(finished)
    try:
        (finished / "params.yaml").write_text(yaml.safe_dump(mutated, sort_keys=False))
        for front_end in (["snakemake", "--cores", "2"], ["dvc", "repro"]):
            p = tool(finished, *front_end)
            assert p.returncode != 0, (front_end, p.stdout[-2000:])
            errors = our_error_lines(p)
            # DVC parses dvc.yaml's templates first: a `runs` it cannot expand stops there, in its own words
            dvc_parse = front_end[0] == "dvc" and ("failed to parse" in p.stderr or "failed to resolve" in p.stderr)
            assert dvc_parse or (len(errors) == 1 and errors[0].startswith("error: params.yaml")), \
                (front_end, p.stdout, p.stderr)
            assert "Traceback" not in p.stdout + p.stderr, front_end
            assert digests(finished) == before, front_end
    finally:
        (finished / "params.yaml").write_text(valid_text)


def test_after_the_invalid_files_the_valid_one_republishes_without_retraining(finished):
    before = digests(finished)
    for front_end in (["snakemake", "--cores", "2"], ["dvc", "repro"]):
        p = tool(finished, *front_end)
        assert p.returncode == 0, (front_end, p.stderr[-3000:])
        assert not trained(p.stdout + p.stderr), front_end
    assert digests(finished) == before


def test_a_failing_value_then_its_revert_republishes_the_finished_work(finished):
    """lr = 1e30 is valid but diverges: the job fails (Snakemake and DVC delete the model file first). Reverting it
    re-publishes the finished checkpoint in seconds, byte for byte, under either front end."""
    before = digests(finished)
    valid_text = (finished / "params.yaml").read_text()
    bad = yaml.safe_load(valid_text)
    bad["methods"]["pgd"]["fashionmnist"]["training"] = {"lr": 1e30}
    for front_end in (["snakemake", "--cores", "2", "results/pgd_fashionmnist.json"], ["dvc", "repro"]):
        (finished / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
        p = tool(finished, *front_end)
        assert p.returncode != 0 and "NaN/inf at epoch 1" in p.stdout + p.stderr, (front_end, p.stdout[-2000:])
        assert "other settings in checkpoints/pgd_fashionmnist_seed0/ are untouched" in p.stdout + p.stderr
        (finished / "params.yaml").write_text(valid_text)
        p = tool(finished, *front_end)
        assert p.returncode == 0, (front_end, p.stderr[-3000:])
        log = (finished / "logs/train/pgd_fashionmnist_seed0.log").read_text()
        # re-published from its checkpoint; or, under DVC, from DVC's own run cache
        assert (not trained(log) and "(finished: publishing it)" in log) or \
            "Stage 'train@pgd-fashionmnist-0' is cached" in p.stdout, (front_end, log, p.stdout)
        assert digests(finished) == before, front_end
    # MLflow: one run per distinct training configuration, told apart by name; the good one logged its totals once
    client = MlflowClient(f"sqlite:///{finished / 'mlruns.db'}")
    exp = client.get_experiment_by_name("advtrain")
    pgd = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("run") == "pgd_fashionmnist_seed0"]
    assert len(pgd) == 2 and len({r.info.run_name for r in pgd}) == 2, [r.info.run_name for r in pgd]
    good = next(r for r in pgd if r.info.status == "FINISHED")
    assert len(client.get_metric_history(good.info.run_id, "train_total_epochs")) == 1


def test_dvc_experiments_show_and_diff_the_robust_accuracy(finished):
    p = tool(finished, "dvc", "exp", "run", "-S", "methods.pgd.fashionmnist.steps=1")
    assert p.returncode == 0, p.stderr[-3000:]
    shown = json.loads(tool(finished, "dvc", "exp", "show", "--json").stdout)
    robust = {}
    for rev in shown:
        for exp_ in [rev, *(e for exps in (rev.get("experiments") or []) for e in exps.get("revs", []))]:
            data = (exp_.get("data") or {})
            metrics = data.get("metrics", {}).get("metrics/pgd_fashionmnist.json", {}).get("data", {}).get("pgd", {})
            if "robust" in metrics:
                robust[exp_.get("name") or exp_["rev"]] = metrics["robust"]
    assert len(robust) >= 2, robust  # the committed run and the experiment, each with its robust accuracy
    diff = json.loads(tool(finished, "dvc", "metrics", "diff", "--all", "--json", "HEAD").stdout)  # workspace against HEAD
    assert "pgd.robust" in diff["metrics/pgd_fashionmnist.json"], diff
    run(["git", "checkout", "HEAD", "--", "."], finished)  # back to the finished run for the tests that follow
    run([str(BIN / "dvc"), "checkout", "-q"], finished)


def test_queued_experiments_run_in_temporary_copies_and_log_to_the_projects_mlflow_store(finished):
    """`dvc exp run --queue -S ...` twice, then `dvc queue start -j 1`: each experiment runs in a temporary copy of
    the workspace (.dvc/tmp/exps/...), yet logs into the workspace's own mlruns.db; `dvc exp show` lists both with
    their robust accuracy and `dvc plots diff` draws both per-epoch curves."""
    names = {}
    for steps in (3, 4):  # settings no run of this project had before, so each trains afresh in its copy
        p = tool(finished, "dvc", "exp", "run", "--queue", "-S", f"methods.pgd.fashionmnist.steps={steps}")
        assert p.returncode == 0, p.stdout + p.stderr
        names[steps] = re.search(r"Queued experiment '([\w-]+)'", p.stdout + p.stderr).group(1)
    p = tool(finished, "dvc", "queue", "start", "-j", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    deadline = time.time() + 600
    while time.time() < deadline:
        status = tool(finished, "dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, status + tool(finished, "dvc", "queue", "logs", names[3]).stdout[-3000:]
    shown = json.loads(tool(finished, "dvc", "exp", "show", "--json").stdout)
    robust = {}
    for rev in shown:
        for exp_ in (e for exps in (rev.get("experiments") or []) for e in exps.get("revs", [])):
            data = exp_.get("data") or {}
            metrics = data.get("metrics", {}).get("metrics/pgd_fashionmnist.json", {}).get("data", {}).get("pgd", {})
            steps = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("methods", {}).get(
                "pgd", {}).get("fashionmnist", {}).get("steps")
            if exp_.get("name") in names.values() and "robust" in metrics:
                robust[steps] = metrics["robust"]
    assert set(robust) == {3, 4}, shown
    client = MlflowClient(f"sqlite:///{finished / 'mlruns.db'}")  # the workspace's store, not the copies'
    exp_id = client.get_experiment_by_name("advtrain").experiment_id
    for steps, acc in robust.items():
        runs = client.search_runs([exp_id], filter_string=f"tags.run = 'pgd_fashionmnist_seed0' and "
                                                          f"params.`method.steps` = '{steps}'")
        # the metrics file rounds to 4 decimals; MLflow has the record's value
        assert len(runs) == 1 and round(runs[0].data.metrics["eval_robust_acc"], 4) == acc, (steps, runs)
        assert any(k.startswith("system/") for k in runs[0].data.metrics)
    assert not list((finished / ".dvc/tmp/exps").glob("*/mlruns*"))  # nothing was logged into a copy
    plots = json.loads(tool(finished, "dvc", "plots", "diff", names[3], names[4], "--json").stdout)["data"]
    curves = [entry for k, v in plots.items() if "metrics/train/pgd_fashionmnist_seed0.json" in k for entry in v]
    assert curves and all(set(names.values()) <= set(c["revisions"]) for c in curves), plots
    points = [d for c in curves for d in c["content"]["data"]["values"]]
    for name in names.values():  # both experiments' epochs 1 and 2, drawn over the epoch
        assert {int(d["epoch"]) for d in points if d["rev"] == name} == {1, 2}, points


# --- the smaller ones, each seen by hand ----------------------------------------------------------------------------

def test_snakemake_interrupted_with_ctrl_c_resumes_with_the_same_command(tmp_path):
    # 9,000 images: about 2 s an epoch here, so that the Ctrl-C surely falls inside the training
    proj = make_project(tmp_path / "p", {"runs": {"methods": ["pgd"], "teacher_methods": [], "seeds": [0]},
                                         "datasets": {"fashionmnist": {"training": {"epochs": 4, "train_subset": 9000}}}})
    run([str(BIN / "advtrain"), "prepare", "fashionmnist"], proj)
    cmd = [str(BIN / "snakemake"), "--cores", "1", "models/pgd_fashionmnist_seed0.pt"]
    proc = subprocess.Popen(cmd, cwd=proj, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = proj / "logs/train/pgd_fashionmnist_seed0.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "epoch 2/4  batch" in log.read_text()):
        time.sleep(0.2)
    # Ctrl-C as a terminal sends it: to the foreground process group, Snakemake and its running job alike (sent to
    # Snakemake alone, it was at times not acted on before the job's last epoch, a few seconds later)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    p = run(cmd, proj)  # the same command, no --rerun-incomplete needed
    assert "resuming after epoch" in p.stdout + p.stderr or "epoch 4/4" in log.read_text()
    assert (proj / "models/pgd_fashionmnist_seed0.pt").exists()


def _check(tmp_path, capsys, *argv) -> tuple[int, str]:
    code = cli.main([*argv, "check"])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("content, needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    ("seed: 0\n".encode("utf-16"), "not UTF-8 text"),
    (b"seed: 0\nseed: 1\n", "key 'seed' is given twice (line 2)"),
    (b"runs: {datasets: [fashionmnist], methods: []}\n", "runs lists no (method, dataset) pair"),
    (b"runs: {}\n", "runs lists no (method, dataset) pair"),
])
def test_a_broken_params_file_gets_one_line(tmp_path, capsys, monkeypatch, content, needle):
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if content.startswith(b"runs:"):
        base["runs"] = yaml.safe_load(content)["runs"]
        content = yaml.safe_dump(base).encode()
    (tmp_path / "params.yaml").write_bytes(content)
    code, err = _check(tmp_path, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_a_folder_given_as_params_gets_one_line(tmp_path, capsys):
    code, err = _check(tmp_path, capsys, "--params", str(tmp_path))
    assert code == 2 and "is a folder, not a params file" in err and len(err.splitlines()) == 1


def test_a_bogus_teacher_model_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["methods"]["dynat"]["teacher_model"] = "resnet9000"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    code, err = _check(tmp_path, capsys)
    assert code == 2 and "methods.dynat.teacher_model must be one of" in err, err


def test_a_download_that_never_answers_fails_in_one_line_and_a_corrupt_archive_is_named(tmp_path, monkeypatch):
    from advtrain.prepared import prepare
    from advtrain.sources import CIFAR10

    silent = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    from torchvision.datasets import CIFAR10 as Torchvision

    class Unanswered(Torchvision):
        url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"

    class Source(CIFAR10):
        def torchvision_dataset(self):
            return Unanswered

    monkeypatch.setenv("ADVTRAIN_DOWNLOAD_TIMEOUT", "2")
    t0 = time.time()
    with pytest.raises(UserError, match="download from .* failed .*timed out.*put the archive"):
        prepare(Source(), tmp_path / "out", tmp_path / "raw")
    assert time.time() - t0 < 60
    silent.close()
    (tmp_path / "raw" / Torchvision.filename).write_bytes(b"not a tar.gz")  # a corrupt archive already there
    with pytest.raises(UserError, match="cifar-10-python.tar.gz: corrupt or truncated .*delete it"):
        prepare(Source(), tmp_path / "out", tmp_path / "raw")


def test_outputs_are_created_with_the_users_umask(tmp_path):
    old = os.umask(0o002)  # a group-shared cluster folder
    try:
        io.write_json(tmp_path / "r.json", {"a": 1})
        io.save_torch(tmp_path / "m.pt", {"a": 1})
    finally:
        os.umask(old)
    for name in ("r.json", "m.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o664, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "r.json"]  # nothing left behind


def test_a_second_trainer_of_the_same_run_is_refused(tmp_path):
    proj = make_project(tmp_path / "p", {"runs": {"methods": ["pgd"], "teacher_methods": [], "seeds": [0]},
                                         "datasets": {"fashionmnist": {"training": {"epochs": 3}}}})
    run([str(BIN / "advtrain"), "prepare", "fashionmnist"], proj)
    first = subprocess.Popen([str(BIN / "advtrain"), "train", "pgd", "fashionmnist"], cwd=proj, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = proj / "checkpoints/pgd_fashionmnist_seed0/.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.1)
    second = tool(proj, "advtrain", "train", "pgd", "fashionmnist")
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:]
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"another advtrain process (pid {first.pid}) is training or evaluating pgd_fashionmnist_seed0" in second.stderr


def test_the_fix_hints_name_commands_that_do_only_that(finished, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(finished, proj)
    model = proj / "models/pgd_fashionmnist_seed0.pt"
    model.write_bytes(model.read_bytes()[:100])
    err = tool(proj, "advtrain", "evaluate", "pgd", "fashionmnist").stderr
    hint = re.search(r"`(snakemake [^`]+)`", err).group(1)
    assert hint == "snakemake --cores 1 --force models/pgd_fashionmnist_seed0.pt", err
    plan = tool(proj, *hint.split()[:1], "-n", *hint.split()[1:]).stdout
    assert re.search(r"^train\s+1$", plan, re.M) and not re.search(r"^(evaluate|report|prepare)\s", plan, re.M), plan
    teacher = proj / "models/teachers/dynat_fashionmnist_seed0.pt"
    teacher.write_bytes(teacher.read_bytes()[:100])
    err = tool(proj, "advtrain", "train", "dynat", "fashionmnist").stderr
    assert "pretrain it again (`snakemake --cores 1 --force models/teachers/dynat_fashionmnist_seed0.pt`" in err, err

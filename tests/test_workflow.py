"""The real workflow tools on the tiny configuration: Snakemake end to end, DVC's selective rerun, the two front ends
in step, MLflow holding what was logged, and the CIFAR-10 job graph planned."""
import base64
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo
from mlflow.tracking import MlflowClient

from conftest import BIN, make_project, run
from test_report_ui import ARTIFACTS, browser, http  # noqa: F401  (browser: the headless Chromium fixture)


def test_snakemake_end_to_end(snakemake_project):
    proj = snakemake_project
    results = {m: json.loads((proj / f"results/{m}_fashionmnist.json").read_text()) for m in ("standard", "pgd")}
    for r in results.values():
        assert r["n_points"] == 100 and r["eps"] == 0.1 and r["threat_model"] == "Linf"
        aa = r["autoattack"]
        assert aa["attacks"] == ["apgd-ce", "apgd-t"] and set(aa["robust_acc_after"]) == set(aa["attacks"])
        stages = [r["clean_acc"], *aa["robust_acc_after"].values()]
        assert all(a >= b for a, b in zip(stages, stages[1:])), stages  # the cascade only removes points
        assert r["robust_acc"] <= min(aa["robust_acc"], r["pgd"]["acc"], r["cw"]["acc"]) + 1e-9
        rb = r["robustbench"]  # RobustBench's model-info shape
        assert rb["eps"] == "1/10" and rb["threat_model"] == "Linf" and rb["architecture"] == "SmallCNN"
        assert rb["clean_acc"] == f"{100 * r['clean_acc']:.2f}" and rb["autoattack_acc"] == f"{100 * aa['robust_acc']:.2f}"
        assert rb["additional_data"] is False and rb["full_test_set"] is False
        assert len(r["examples"]["adv_u8"]) == 8
        assert r["train"]["passes"] > 0 and r["versions"]["torch"]
    # PGD-AT really is more robust than standard training, on the same data and budget
    assert results["pgd"]["robust_acc"] > results["standard"]["robust_acc"] + 0.10, results
    assert results["standard"]["clean_acc"] > 0.5
    metrics = json.loads((proj / "metrics/train/pgd_fashionmnist_seed0.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    e = metrics["epochs"][0]
    # 6000 images, the last 300 held out for validation: 57 batches of 100, PGD-3 costs 3 + 1 passes each
    assert e["attack_steps"] == 3 and e["passes"] == 57 * (3 + 1) and e["grad_l1"] > 0 and e["adv_acc"] is not None
    html = (proj / "reports/report.html").read_text()
    assert "<table class=results>" in html and "CHECK FAILED" not in html
    for fig in ("curves", "dynat_labels", "autoattack_stages", "examples", "time"):
        assert f'id="fig-fashionmnist_{fig}"' in html, fig
    assert html.count("data:image/png;base64,") == 5
    assert "| pgd | small_cnn | 100 |" in (proj / "reports/report.md").read_text()


def test_two_seeds_give_means_stds_and_intervals(snakemake_project):
    """runs.seeds: [0, 1]: every (method, dataset) trained and evaluated once per seed; results/METHOD_DATASET.json
    is the first seed's record plus the summary over seeds; the report shows mean ± std [95% interval]."""
    proj = snakemake_project
    r = json.loads((proj / "results/pgd_fashionmnist.json").read_text())
    per_seed = [json.loads((proj / f"results/seeds/pgd_fashionmnist/seed{s}.json").read_text()) for s in (0, 1)]
    assert r["seeds"]["seeds"] == [0, 1] and [p["seed"] for p in per_seed] == [0, 1]
    assert r["robust_acc"] == per_seed[0]["robust_acc"]  # the first seed's record, unchanged
    assert per_seed[0]["robust_acc"] != per_seed[1]["robust_acc"] or per_seed[0]["clean_acc"] != per_seed[1]["clean_acc"]
    s = r["seeds"]["summary"]["robust_acc"]
    values = [p["robust_acc"] for p in per_seed]
    assert s["values"] == values and abs(s["mean"] - sum(values) / 2) < 1e-12
    assert abs(s["std"] - abs(values[0] - values[1]) / 2 ** 0.5) < 1e-12  # sample std of two values
    assert s["ci95"][0] < s["mean"] < s["ci95"][1]
    # the model file holds the epoch of best validation robust accuracy on held-out training images
    sel = per_seed[0]["selection"]
    assert sel["select"] == "best" and sel["val_points"] == 300 and sel["epoch"] in (1, 2)
    curves = json.loads((proj / "metrics/train/pgd_fashionmnist_seed0.json").read_text())["epochs"]
    assert sel["value"] == max(c["val_pgd_acc"] for c in curves)
    md = (proj / "reports/report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| pgd | small_cnn | 100 | 2 |"))
    assert re.search(r"\d+\.\d\d ± \d+\.\d\d \[\d+\.\d, \d+\.\d\]", row), row
    # the methods compared by the sign-flip test over the test points, Holm-corrected over the 3 pairs
    assert "(paired permutation) test over the 100 test points" in md and "Holm-corrected over the 3 pairs" in md


def test_mlflow_holds_the_logged_metrics(snakemake_project):
    client = MlflowClient(f"sqlite:///{snakemake_project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("advtrain")
    runs = {r.data.tags.get("run", r.info.run_name): r for r in client.search_runs([exp.experiment_id])}
    # one run per (method, dataset, seed), DYNAT's teacher per seed, the report
    assert set(runs) == {f"{name}_fashionmnist_seed{s}" for name in ("standard", "pgd", "teacher_dynat", "dynat")
                         for s in (0, 1)} | {"report"}
    report_files = {a.path for a in client.list_artifacts(runs["report"].info.run_id)}
    assert {"report.html", "report.md", "figures"} <= report_files
    figures = {a.path for a in client.list_artifacts(runs["report"].info.run_id, "figures")}
    assert "figures/fashionmnist_examples.png" in figures
    run_ = runs["pgd_fashionmnist_seed0"]
    assert run_.info.run_name.startswith("pgd_fashionmnist_seed0@")  # the run and its settings' fingerprint
    history = client.get_metric_history(run_.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    local = json.loads((snakemake_project / "metrics/train/pgd_fashionmnist_seed0.json").read_text())
    assert [m.value for m in history] == [e["loss"] for e in local["epochs"]]
    for key in ("train_grad_l1", "train_attack_steps", "train_passes", "train_seconds", "train_adv_acc"):
        assert len(client.get_metric_history(run_.info.run_id, key)) == 2, key
    result = json.loads((snakemake_project / "results/seeds/pgd_fashionmnist/seed0.json").read_text())
    assert run_.data.metrics["eval_autoattack_acc"] == result["autoattack"]["robust_acc"]  # evaluation, same run
    assert run_.data.metrics["eval_cw_acc"] == result["cw"]["acc"]
    assert run_.data.params["method.steps"] == "3" and run_.data.params["eps"] == "0.1"
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"pgd_fashionmnist_seed0.json"} <= artifacts


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    """A project built from nothing by `dvc repro` (PGD-AT, and DYNAT with its teacher), which the tests below copy
    and change."""
    proj = make_project(tmp_path_factory.mktemp("dvc") / "p", {
        "runs": {"methods": ["pgd"], "teacher_methods": ["dynat"], "seeds": [0]},
        "datasets": {"fashionmnist": {"evaluation": {"autoattack": "off"}}}})
    first = run([str(BIN / "dvc"), "repro"], proj).stdout
    assert "Running stage 'prepare@fashionmnist'" in first and "Running stage 'report'" in first
    assert "Running stage 'pretrain@dynat-fashionmnist-0'" in first
    return proj


def test_dvc_repro_reruns_only_what_changed(reproduced, tmp_path):
    proj = shutil.copytree(reproduced, tmp_path / "dvc")
    model_before = (proj / "models/pgd_fashionmnist_seed0.pt").read_bytes()
    push_then_pull_from_the_remote(proj, tmp_path / "remote")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["pgd"]["fashionmnist"]["training"] = {"lr": 0.02}  # one training parameter of PGD-AT's
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = run([str(BIN / "dvc"), "repro"], proj).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", second))
    # check: params.yaml is validated first whenever it changed (its marker stays the same, so prepare does not rerun)
    assert ran == {"check", "train@pgd-fashionmnist-0", "evaluate@pgd-fashionmnist-0", "aggregate@pgd-fashionmnist",
                   "report"}, second
    assert "prepare@fashionmnist" not in ran
    assert (proj / "models/pgd_fashionmnist_seed0.pt").read_bytes() != model_before
    third = run([str(BIN / "dvc"), "repro"], proj).stdout
    assert "Running stage" not in third  # nothing changed, nothing reruns


CURVES = ["loss", "adv_acc", "clean_acc", "val_clean_acc", "val_pgd_acc", "grad_l1"]
TERMINAL = 200  # columns


def test_dvc_exp_show_and_plots_diff_show_what_a_researcher_compares(reproduced, tmp_path, browser):  # noqa: F811
    """After an experiment (PGD-AT with one attack step instead of three): `dvc exp show` lists each (method,
    dataset)'s small metrics file, accuracies first, and with --only-changed (its stage hashes dropped) fits a
    200-column terminal; `dvc plots diff` draws each run's per-epoch curves of both revisions, one panel per quantity
    with its own y axis, which headless Chromium renders offline with the Vega that Snakemake ships (DVC's page
    loads it from a CDN; its --html-template takes our own page instead). The outputs are kept under
    test-artifacts/: dvc_exp_show.txt, dvc_plots_diff.png."""
    proj = shutil.copytree(reproduced, tmp_path / "shown")
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the finished runs"], proj)
    dvc = str(BIN / "dvc")
    p = run([dvc, "exp", "run", "-S", "methods.pgd.fashionmnist.steps=1"], proj)
    out = p.stdout + p.stderr
    name = re.search(r"Ran experiment\(s\): ([\w-]+)", out).group(1)
    header = run([dvc, "exp", "show", "--csv", "--no-pager"], proj).stdout.splitlines()[0].split(",")
    metrics = [h for h in header if h.startswith(("pgd.", "dynat."))]
    assert metrics[:9] == [f"pgd.{k}" for k in ("clean", "PGD", "CW", "AutoAttack", "robust", "robust_lo",
                                                  "robust_hi", "passes", "epoch")], header
    assert header.index(metrics[-1]) < min(header.index(h) for h in header if h.startswith("methods.")), header
    shown = run([dvc, "exp", "show", "--no-pager", "--only-changed", "--drop", "^(models/|results|metrics/train)"],
                proj, extra_env={"COLUMNS": str(TERMINAL)}).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= TERMINAL and "…" not in shown, shown  # every column whole
    assert re.search(r"pgd\.clean +pgd\.PGD +pgd\.CW +pgd\.AutoAttack +pgd\.robust +pgd\.robust_lo", shown), shown
    assert "methods.pgd.fashionmnist.steps" in shown and name in shown
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dvc_exp_show.txt").write_text(
        f"$ dvc exp show --csv  ({len(header)} columns; the metrics first: {', '.join(metrics)})\n\n"
        f"$ COLUMNS={TERMINAL} dvc exp show --only-changed --drop '^(models/|results|metrics/train)'\n{shown}")
    # the curves of the committed runs and of the experiment, each quantity its own panel
    plots = json.loads(run([dvc, "plots", "diff", "HEAD", name, "--json"], proj).stdout)["data"]
    pgd = plots["metrics/train/pgd_fashionmnist_seed0.json"][0]["content"]
    assert pgd["facet"]["field"] == "field" and pgd["resolve"]["scale"]["y"] == "independent"
    values = pgd["data"]["values"]
    assert {v["field"] for v in values} == set(CURVES) and {v["rev"] for v in values} == {"HEAD", name}
    assert {(v["rev"], v["epoch"]) for v in values} == {(rev, e) for rev in ("HEAD", name) for e in (1, 2)}
    assert not any("teachers" in k for k in plots)  # a teacher's one-epoch curve is not plotted
    assets = Path(__import__("snakemake").__file__).parent / "assets" / "data"
    page = tmp_path / "offline.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset=utf-8><title>dvc plots diff</title>"
                    + "".join(f'<script src="{(assets / lib / (lib + ".js")).as_uri()}"></script>'
                              for lib in ("vega", "vega-lite", "vega-embed"))
                    + "</head><body>{plot_divs}</body></html>")
    run([dvc, "plots", "diff", "HEAD", name, "--html-template", str(page), "-o", str(tmp_path / "plots")], proj)
    index = tmp_path / "plots/index.html"
    assert "cdn.jsdelivr" not in index.read_text()
    http("POST", f"{browser}/window/rect", {"width": 1000, "height": 1000})
    http("POST", f"{browser}/url", {"url": index.as_uri()})
    deadline, drawn = time.time() + 60, {}
    while time.time() < deadline:  # vega-embed draws each chart once its spec is compiled
        drawn = http("POST", f"{browser}/execute/sync", {"script": """
            const divs = [...document.querySelectorAll('body > div[id]')];
            return {divs: divs.length, drawn: divs.filter(d => d.querySelector('canvas, svg')).length,
                    height: document.documentElement.scrollHeight}""", "args": []})["value"]
        if drawn["divs"] and drawn["drawn"] == drawn["divs"]:
            break
        time.sleep(0.5)
    assert drawn["divs"] == 2 and drawn["drawn"] == 2, drawn  # PGD-AT's and DYNAT's runs
    time.sleep(1)  # the charts' own layout, after their canvases are in
    height = http("POST", f"{browser}/execute/sync", {"script": "return document.documentElement.scrollHeight",
                                                      "args": []})["value"]
    assert height > 600, height  # two runs' charts, six panels each
    http("POST", f"{browser}/window/rect", {"width": 1000, "height": min(int(height) + 200, 8000)})
    png = base64.b64decode(http("GET", f"{browser}/screenshot")["value"])
    assert len(png) > 30_000
    (ARTIFACTS / "dvc_plots_diff.png").write_bytes(png)
    print(f"\n`dvc exp show` and `dvc plots diff` as shown: {ARTIFACTS / 'dvc_exp_show.txt'}, "
          f"{ARTIFACTS / 'dvc_plots_diff.png'}")


def push_then_pull_from_the_remote(proj, remote):
    """The project's default remote `local`, repointed with the one command the README gives: `dvc push`, the cache
    and every cached output deleted, `dvc pull` gives every file back byte for byte (the uncached metrics and results
    summaries are git's, not DVC's)."""
    dvc = str(BIN / "dvc")
    assert run([dvc, "remote", "default"], proj).stdout.strip() == "local"
    run([dvc, "remote", "modify", "local", "url", str(remote)], proj)
    run([dvc, "push"], proj)
    cached = ["data/prepared", "models", "results/seeds"]

    def files() -> dict:  # DVC's .gitignore files in output folders are git's business
        return {p: p.read_bytes() for d in cached for p in sorted((proj / d).rglob("*"))
                if p.is_file() and p.name != ".gitignore"}

    before = files()
    assert {proj / "models/pgd_fashionmnist_seed0.pt", proj / "results/seeds/pgd_fashionmnist/seed0.json"} <= set(before)
    for path in before:  # every cached output file (DVC's .gitignore beside them stays, as a clone has it)
        path.unlink()
    shutil.rmtree(proj / ".dvc/cache")
    assert files() == {}
    run([dvc, "pull"], proj)
    assert files() == before
    assert "up to date" in run([dvc, "status"], proj).stdout


def test_snakemake_and_dvc_run_the_same_commands(tmp_path):
    """Both front ends must call the same entry points with the same paths."""
    proj = make_project(tmp_path / "same")
    snake = run([str(BIN / "snakemake"), "--cores", "1", "--dry-run", "--printshellcmds"], proj).stdout
    snake_cmds = {m.strip() for m in re.findall(r"^(?:Shell command: )?(advtrain .*)$", snake, re.M)}
    # each stage's output also goes to its log file (Snakemake's `log:`); the stage itself is what follows
    stages = {re.sub(r"^advtrain --log \S+ ", "advtrain ", c) for c in snake_cmds}
    with Repo(str(proj)) as repo:  # DVC's own rendering of dvc.yaml (its foreach/matrix templating resolved)
        # DVC's check stage stands for the Snakefile's validation when it loads (DVC has no such hook)
        dvc_cmds = {stage.cmd for stage in repo.index.stages} - {"advtrain --log logs/check/check.log check --out logs/check/params.valid"}
    assert snake_cmds == dvc_cmds, (snake_cmds, dvc_cmds)
    assert {"advtrain prepare fashionmnist", "advtrain pretrain dynat fashionmnist --seed 0",
            "advtrain train pgd fashionmnist --seed 1", "advtrain train dynat fashionmnist --seed 0",
            "advtrain evaluate dynat fashionmnist --seed 1", "advtrain aggregate pgd fashionmnist",
            "advtrain report"} <= stages


def jobs(plan: str, rule: str) -> list[str]:
    """The blocks of a dry run's plan that describe jobs of `rule`."""
    return [b for b in plan.split("\n\n") if re.search(rf"^(local)?rule {rule}:", b, re.M)]


def test_snakemake_plans_the_cifar10_graph_and_the_tiny_one_with_threads_and_priorities(tmp_path):
    proj = make_project(tmp_path / "plan", {"methods": {"pgd": {"fashionmnist": {"evaluation": {"autoattack": "standard"}}}}})
    out = run([str(BIN / "snakemake"), "-n", "--cores", "8", "results/pgd_cifar10.json"], proj).stdout
    for rule in ("prepare", "train", "evaluate", "aggregate"):
        assert re.search(rf"^{rule}\s+\d+\b", out, re.M), out  # one job per seed of runs.seeds
    # a CPU job takes its model's cpu_threads: PreActResNet-18 all 8 cores, the small CNN one, so that two run at once
    assert all("threads: 8" in b for b in jobs(out, "train")), out
    out = run([str(BIN / "snakemake"), "-n", "--cores", "2"], proj).stdout
    train = jobs(out, "train")
    # (Snakemake prints no `threads:` line for one thread; cpus_per_task is the rules' threads)
    assert len(train) == 6 and all("cpus_per_task=1," in b and "threads:" not in b for b in train), out  # 3 x 2 seeds
    # the run whose evaluation has AutoAttack's standard version (FAB-T, Square: the longest job) goes first
    for rule in ("train", "evaluate"):
        priority = {re.search(r"method=(\w+)", b).group(1): int(re.search(r"priority: (\d+)", b).group(1))
                    for b in jobs(out, rule)}
        assert priority == {"pgd": 4, "standard": 2, "dynat": 2}, (rule, out)


def test_dynat_end_to_end_in_the_report(snakemake_project):
    proj = snakemake_project
    dynat = json.loads((proj / "metrics/train/dynat_fashionmnist_seed0.json").read_text())
    teacher = json.loads((proj / "metrics/teachers/dynat_fashionmnist_seed0.json").read_text())
    assert len(teacher["epochs"]) == 1 and len(dynat["epochs"]) == 2
    for e in dynat["epochs"]:
        assert 0 <= e["label_agreement"] <= 1 and 0 <= e["teacher_acc"] <= 1
    assert json.loads((proj / "results/dynat_fashionmnist.json").read_text())["autoattack"]["robust_acc"] >= 0
    assert "| dynat | small_cnn | 100 |" in (proj / "reports/report.md").read_text()


def test_changing_teacher_epochs_reruns_pretrain_and_what_follows_only(reproduced, tmp_path):
    proj = shutil.copytree(reproduced, tmp_path / "dvc_dynat")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["dynat"]["fashionmnist"]["teacher_epochs"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro"], proj).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"check", "pretrain@dynat-fashionmnist-0", "train_with_teacher@dynat-fashionmnist-0",
                   "evaluate_with_teacher@dynat-fashionmnist-0", "aggregate_with_teacher@dynat-fashionmnist", "report"}, out
    assert len(json.loads((proj / "metrics/teachers/dynat_fashionmnist_seed0.json").read_text())["epochs"]) == 2

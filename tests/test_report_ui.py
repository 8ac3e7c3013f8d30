"""What a person sees: the report rendered by a real headless Chromium (driven over the W3C WebDriver protocol by
Debian's chromedriver), and the metrics read back through the REST API of a real MLflow server on 127.0.0.1."""
import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from advtrain.tracking import experiment_url
from conftest import BIN, ROOT, env

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("ADVTRAIN_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds}s")


@pytest.fixture
def browser():
    """A WebDriver session on headless Chromium: (base URL of the session, driver process)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are needed: `make test` installs them (apt-get install chromium "
                    "chromium-driver)")
    port = free_port()
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/status", proc)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                         "--window-size=1280,1000"]}}}}
        session = http("POST", f"{base}/session", caps)["value"]["sessionId"]
        yield f"{base}/session/{session}"
        http("DELETE", f"{base}/session/{session}")
    finally:
        proc.terminate()
        proc.wait(10)


def test_report_renders_in_chromium_with_its_table_and_every_plot(snakemake_project, browser):
    page = snakemake_project / "reports/report.html"
    http("POST", f"{browser}/url", {"url": page.as_uri()})
    script = """
      const figs = [...document.querySelectorAll('figure')].map(f => {
        const img = f.querySelector('img');
        return {id: f.id, caption: f.querySelector('figcaption').textContent,
                loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth,
                shown: img.getBoundingClientRect().width};
      });
      const rows = [...document.querySelectorAll('table tbody tr')].map(r => r.cells[0].querySelector('b').textContent);
      const header = [...document.querySelectorAll('table thead th')].map(h => h.textContent);
      return {title: document.title, figs, rows, header,
              checks: document.querySelector('.ok, .bad').textContent, height: document.body.scrollHeight};"""
    seen = http("POST", f"{browser}/execute/sync", {"script": script, "args": []})["value"]
    assert seen["title"] == "Adversarial training report"
    assert seen["rows"] == ["standard", "pgd", "dynat"], seen["rows"]
    assert {"clean %", "PGD %", "CW %", "AutoAttack %", "robust (min) %"} <= set(seen["header"])
    ids = {f["id"] for f in seen["figs"]}
    assert ids == {f"fig-fashionmnist_{n}" for n in ("curves", "dynat_labels", "autoattack_stages", "examples", "time")}
    for f in seen["figs"]:  # every plot decoded by the browser and laid out at a visible size
        assert f["loaded"] and f["width"] > 200 and f["shown"] > 200, f
    assert seen["checks"].startswith("Checks:"), seen["checks"]
    assert_table_fits(browser, 1400)
    # the whole page as the browser drew it, kept for a person to look at
    http("POST", f"{browser}/window/rect", {"width": 1280, "height": min(int(seen["height"]) + 50, 16000)})
    png = base64.b64decode(http("GET", f"{browser}/screenshot")["value"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report_chromium.png").write_bytes(png)


def assert_table_fits(browser: str, width: int) -> dict:
    """At a window `width` px wide, the comparison table fits: no horizontal scrolling, its right edge inside the
    window, no cell's content cut off, and each cell's lines unbroken (an interval on one line)."""
    http("POST", f"{browser}/window/rect", {"width": width, "height": 1000})
    seen = http("POST", f"{browser}/execute/sync", {"script": """
        const table = document.querySelector('table.results');
        const cells = [...table.querySelectorAll('th, td')];
        const lines = el => { const r = document.createRange(); r.selectNodeContents(el);
                              return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size; };
        return {inner: window.innerWidth, page: document.documentElement.scrollWidth, table: table.scrollWidth,
                right: table.getBoundingClientRect().right, columns: table.rows[0].cells.length,
                cut: cells.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent),
                broken: [...table.querySelectorAll('td')].flatMap(td => [...td.childNodes]).filter(
                    n => n.textContent.trim() && lines(n) > 1).map(n => n.textContent)};""", "args": []})["value"]
    assert seen["inner"] <= width, seen
    assert seen["page"] <= seen["inner"] and seen["right"] <= seen["inner"], seen  # no column off the window
    assert seen["table"] <= seen["right"], seen
    assert seen["cut"] == [] and seen["broken"] == [], seen
    return seen


def test_the_report_table_fits_a_1400_px_window_at_its_widest(browser, tmp_path, monkeypatch):
    """The widest table the report makes: eight methods, AutoAttack's standard version for two of them (so the
    column of robust accuracy on the shared attacks is there), five seeds (± std in every cell), 10,000 test points.
    Its screenshot at 1,400 px is kept as test-artifacts/report_table_1400.png."""
    from advtrain.report import build_report
    from test_report import write_results

    monkeypatch.chdir(tmp_path)
    runs = write_results(tmp_path, seeds=(0, 1, 2, 3, 4), n=10_000)
    page, _ = build_report(runs, tmp_path / "reports")
    http("POST", f"{browser}/url", {"url": page.resolve().as_uri()})
    seen = assert_table_fits(browser, 1400)
    assert seen["columns"] == 11, seen  # method, 4 accuracies, AutoAttack, robust (min), shared, passes, s, epoch
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report_table_1400.png").write_bytes(base64.b64decode(http("GET", f"{browser}/screenshot")["value"]))
    print(f"\nthe report's table at 1,400 px: {ARTIFACTS / 'report_table_1400.png'}")


def test_mlflow_server_serves_the_runs_metrics_over_rest(snakemake_project):
    port = free_port()
    db = f"sqlite:///{snakemake_project / 'mlruns.db'}"
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", db, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=snakemake_project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        exp = http("GET", f"{api}/experiments/get-by-name?experiment_name=advtrain")["experiment"]
        runs = http("POST", f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                   "filter": "tags.run = 'pgd_fashionmnist_seed0'"})["runs"]
        assert len(runs) == 1
        run_id = runs[0]["info"]["run_id"]
        history = http("GET", f"{api}/metrics/get-history?run_id={run_id}&metric_key=train_loss")["metrics"]
        local = json.loads((snakemake_project / "metrics/train/pgd_fashionmnist_seed0.json").read_text())
        assert sorted((m["step"], m["value"]) for m in history) == [(e["epoch"], e["loss"]) for e in local["epochs"]]
        for key in ("train_grad_l1", "train_attack_steps", "train_seconds"):
            h = http("GET", f"{api}/metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]
            assert [m["step"] for m in sorted(h, key=lambda m: m["step"])] == [1, 2], key
        metrics = {m["key"]: m["value"] for m in http("GET", f"{api}/runs/get?run_id={run_id}")["run"]["data"]["metrics"]}
        result = json.loads((snakemake_project / "results/seeds/pgd_fashionmnist/seed0.json").read_text())
        assert metrics["eval_autoattack_acc"] == result["autoattack"]["robust_acc"]
        assert metrics["eval_robust_acc"] == result["robust_acc"] and metrics["eval_cw_acc"] == result["cw"]["acc"]
        for attack, acc in result["autoattack"]["robust_acc_after"].items():
            assert metrics[f"eval_aa_{attack}"] == acc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def page_text_with(browser: str, url: str, needles: list[str], seconds: float = 90) -> str:
    """Open `url` and wait until the page's rendered text holds every needle (MLflow's UI renders in the browser)."""
    http("POST", f"{browser}/url", {"url": url})
    deadline = time.time() + seconds
    text = ""
    while time.time() < deadline:
        text = http("POST", f"{browser}/execute/sync",
                    {"script": "return document.body.innerText", "args": []})["value"]
        if all(n in text for n in needles):
            return text
        time.sleep(1)
    raise AssertionError(f"{url}: {[n for n in needles if n not in text]} not shown; the page says:\n{text[:3000]}")


def screenshot(browser: str, name: str) -> None:
    png = base64.b64decode(http("GET", f"{browser}/screenshot")["value"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_bytes(png)


def test_mlflow_ui_shows_the_runs_robust_accuracy_the_registered_model_and_system_metrics(snakemake_project, browser):
    """The page the report prints (#/experiments/ID/runs?workflowType=machine_learning&viewStateShareKey=advtrain)
    opens on the runs table with the accuracy columns, sorted by robust accuracy, not on MLflow 3's GenAI overview; the registry page shows the model and its alias; a
    training run's system metrics tab draws its charts. Screenshots of each are kept under test-artifacts/."""
    client = MlflowClient(f"sqlite:///{snakemake_project / 'mlruns.db'}")
    exp_id = client.get_experiment_by_name("advtrain").experiment_id
    version = client.get_model_version_by_alias("advtrain-pgd-fashionmnist", "evaluated")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{snakemake_project / 'mlruns.db'}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=snakemake_project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health", proc)
        http("POST", f"{browser}/window/rect", {"width": 2400, "height": 900})  # every selected column in view
        text = page_text_with(browser, experiment_url(exp_id, base),
                              ["Sort: eval_robust_acc", "eval_robust_acc", "eval_clean_acc", "Model registry",
                               "pgd_fashionmnist_seed0@", "dynat_fashionmnist_seed1@", "advtrain-pgd-fashionmnist"])
        assert "Training runs" not in text and "GenAI apps" not in text  # the classic side bar, not GenAI's
        rows = http("POST", f"{browser}/execute/sync", {"script": """
            return [...document.querySelectorAll('[role=row]')].map(r => r.innerText.replace(/\\s+/g, ' '))""",
                                                        "args": []})["value"]
        assert any("pgd_fashionmnist_seed0@" in r for r in rows), rows
        screenshot(browser, "mlflow_runs.png")
        page_text_with(browser, f"{base}/#/models/advtrain-pgd-fashionmnist?workflowType=machine_learning",
                       ["advtrain-pgd-fashionmnist", "Version 1", "Version 2", "evaluated", "robust_acc",
                        "pixels in [0, 1]"])
        screenshot(browser, "mlflow_registered_model.png")
        run_page = f"{base}/#/experiments/{exp_id}/runs/{version.run_id}/system-metrics"
        page_text_with(browser, f"{run_page}?workflowType=machine_learning",
                       ["System metrics", "cpu_utilization_percentage", "disk_usage_percentage"])
        # the charts come after the text: MLflow loads its plotting library and draws each chart when it is in view
        deadline, charts = time.time() + 30, 0
        while time.time() < deadline and not charts:
            charts = http("POST", f"{browser}/execute/sync", {"script": "return document.querySelectorAll("
                                                                        "'.js-plotly-plot, canvas, svg.main-svg').length",
                                                              "args": []})["value"]
            time.sleep(0 if charts else 1)
        assert charts > 0
        screenshot(browser, "mlflow_system_metrics.png")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

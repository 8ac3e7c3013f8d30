"""Per-stage start-up: the wall time of a stage's command beyond the work it reports doing.

    python benchmarks/startup.py --repeats 3 [--out startup.json]

In a throwaway project (the repository's params.yaml with tests/configs/tiny.yaml over it, Fashion-MNIST prepared
once), each command runs REPEATS times, from scratch each time, as a user types it (no Snakemake; torch's default
threads):

  train     `advtrain train pgd fashionmnist --restart`: wall time minus the sum of its epochs' `seconds` (the
            metrics JSON); what is left is the start-up (imports, data, MLflow run, model) and the ending
            (per-epoch validation, checkpoints, model file, MLflow model)
  evaluate  `advtrain evaluate pgd fashionmnist`, its finished-evaluation record removed first: wall time minus its
            clean pass and attacks' seconds (the result JSON)
  check     `advtrain check`: wall time (it only validates params.yaml)
  torch     `python -c "import torch"`: the floor every stage that trains or attacks pays

The MLflow store (sqlite:///mlruns.db in the project) is created by the first training run and kept, as a user's
is; so each row's first repeat of `train` also pays the store's creation. Prints a table; --out writes every
figure as JSON."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from advtrain.config import merge

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def project(where: Path) -> Path:
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   yaml.safe_load((ROOT / "tests/configs/tiny.yaml").read_text()))
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return where


def timed(args: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ADVTRAIN_PARAMS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args()
    rows: dict[str, list[dict]] = {"train": [], "evaluate": [], "check": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        proj = project(Path(tmp))
        advtrain = str(BIN / "advtrain")
        timed([advtrain, "prepare", "fashionmnist"], proj)
        metrics = proj / "metrics/train/pgd_fashionmnist_seed0.json"
        result = proj / "results/seeds/pgd_fashionmnist/seed0.json"
        for i in range(a.repeats):
            wall = timed([advtrain, "train", "pgd", "fashionmnist", "--restart"], proj)
            work = sum(e["seconds"] for e in json.loads(metrics.read_text())["epochs"])
            rows["train"].append({"wall": wall, "work": work})
            shutil.rmtree(proj / "checkpoints/eval", ignore_errors=True)  # the finished evaluation's record
            wall = timed([advtrain, "evaluate", "pgd", "fashionmnist"], proj)
            work = sum(json.loads(result.read_text())["seconds"].values())
            rows["evaluate"].append({"wall": wall, "work": work})
            rows["check"].append({"wall": timed([advtrain, "check"], proj), "work": 0.0})
            rows["torch"].append({"wall": timed([sys.executable, "-c", "import torch"], proj), "work": 0.0})
            print(f"repeat {i + 1}/{a.repeats} done", file=sys.stderr, flush=True)
    print(f"{'stage':10} {'wall s':>24} {'work s':>24} {'wall - work s':>24}   (each repeat; median last)")
    for stage, rs in rows.items():
        def col(f):
            vals = [f(r) for r in rs]
            return " ".join(f"{v:5.1f}" for v in vals) + f" | {statistics.median(vals):5.1f}"
        print(f"{stage:10} {col(lambda r: r['wall']):>24} {col(lambda r: r['work']):>24} "
              f"{col(lambda r: r['wall'] - r['work']):>24}")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.2f}; {os.cpu_count()} cores")
    if a.out:
        tmp_out = Path(a.out).with_suffix(".tmp")
        tmp_out.write_text(json.dumps({"rows": rows, "load_average": load}, indent=1))
        os.replace(tmp_out, a.out)


if __name__ == "__main__":
    main()

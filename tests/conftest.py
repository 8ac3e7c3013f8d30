"""Shared fixtures: a throwaway copy of the project (Snakefile, workflow/, dvc.yaml, a tiny params.yaml) inside a
fresh git + DVC repository, and helpers that run the real command-line tools in it.

`make test` runs the suite on every core with pytest-xdist (`-n auto --dist loadgroup`): the tests of one file share
a worker, so a module's fixture is built once, and so do all the tests that read `snakemake_project`, which is built
once per session. Each worker's torch gets its share of the cores; every command a test starts runs on one thread,
as a Snakemake job of the tiny model does (its rules give small_cnn one thread)."""
from __future__ import annotations

import os
import signal

# before torch is imported (the tests import it): a worker's share of the cores, so that the workers'
# OpenMP threads do not outnumber the cores (they spin at their barriers while they wait for each other)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from advtrain.cpus import usable_cpus

    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# pytest-xdist's workers ignore SIGINT (the controller takes Ctrl-C), and an ignored signal stays ignored in every
# process they start: the commands a test interrupts with Ctrl-C must get Python's usual KeyboardInterrupt
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advtrain.config import merge

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: advtrain, snakemake, dvc
FASHION = Path(os.environ.get("ADVTRAIN_FASHIONMNIST_DIR", "/usr/share/datasets/fashion-mnist"))

TINY = yaml.safe_load((ROOT / "tests/configs/tiny.yaml").read_text())  # the tiny configuration, an overlay


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("ADVTRAIN_PARAMS", None)
    e["DVC_NO_ANALYTICS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"  # as a Snakemake job of the tiny model runs: a direct run and a job give the same bits
    return e


def run(args: list[str], cwd: Path, check: bool = True, timeout: int = 900,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def deep_update(base: dict, over: dict) -> dict:
    return merge(base, over)  # Snakemake's merge of configfiles, and advtrain's


def make_project(path: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repo holding the workflow and params.yaml (the repo's own, with TINY and `overrides` applied)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    shutil.copytree(ROOT / "workflow", path / "workflow")
    shutil.copytree(ROOT / "profiles", path / "profiles")
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), deep_update(TINY, overrides or {}))
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], path)
    run(["dvc", "init", "-q"], path)
    shutil.copy(ROOT / ".dvc/config", path / ".dvc/config")  # the project's own: its default remote `local`
    shutil.copytree(ROOT / ".dvc/plots", path / ".dvc/plots", dirs_exist_ok=True)  # dvc.yaml's plot template
    run(["dvc", "config", "core.analytics", "false"], path)
    return path


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """pytest-xdist's groups (--dist loadgroup): the readers of the session's `snakemake_project` together, every
    other test with the other tests of its file (their module-scoped fixtures are built once)."""
    for item in items:
        group = "snakemake_project" if "snakemake_project" in getattr(item, "fixturenames", ()) else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def _needs_fashion_mnist():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.exit(f"Fashion-MNIST not found at {FASHION}: `make test` installs it (apt-get install dataset-fashion-mnist)",
                    returncode=2)


@pytest.fixture(scope="session")
def snakemake_project(tmp_path_factory) -> Path:
    """The whole workflow run once with Snakemake on the tiny configuration; several tests read its outputs."""
    proj = make_project(tmp_path_factory.mktemp("snake"))
    p = run([str(BIN / "snakemake"), "--cores", "2"], proj)
    (proj / "snakemake.log").write_text(p.stdout + p.stderr)
    return proj


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A project folder with Fashion-MNIST prepared (no training)."""
    proj = make_project(tmp_path_factory.mktemp("prepared"))
    run([str(BIN / "advtrain"), "prepare", "fashionmnist"], proj)
    return proj

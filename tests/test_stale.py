"""Nothing stale: a training checkpoint is valid for the prepared images it was trained on. Other data (images
removed, a class added) trains afresh, through `advtrain`, `snakemake` and `dvc repro` alike, and the old data's
checkpoint stays under its own key, so going back to that data re-publishes its model byte for byte."""
import json
import re
import shutil
from pathlib import Path

import torch
import yaml

from advtrain.prepared import data_digest
from conftest import BIN, ROOT, deep_update, make_project, run
from imagefolder_data import make_image_folder

# one method, one epoch on 96 training images (32 held out for validation): two minibatches
OVERLAY = deep_update(yaml.safe_load((ROOT / "tests/configs/imagefolder.yaml").read_text()),
                      {"runs": {"methods": ["pgd"]}})
MODEL = "models/pgd_shapes_seed0.pt"
FRESH = re.compile(r"\] epoch \d+/\d+\s+(batch|loss)")  # an epoch trained, not a finished checkpoint published


def project(tmp: Path, name: str) -> Path:
    proj = make_project(tmp / name, OVERLAY)
    make_image_folder(proj / "data/raw/shapes", n_train=96, n_test=16)
    return proj


def digest(proj: Path) -> str:
    return data_digest(json.loads((proj / "data/prepared/shapes/meta.json").read_text()), "train")


def model_meta(proj: Path) -> dict:
    return torch.load(proj / MODEL, weights_only=True)["meta"]


def remove_images(proj: Path, n: int, stash: Path) -> None:
    """Move n training images of class 1 out of the folder (to put them back later)."""
    stash.mkdir(parents=True, exist_ok=True)
    for f in sorted((proj / "data/raw/shapes/train/class1").iterdir())[:n]:
        shutil.move(f, stash / f.name)


def advtrain(proj: Path, *args: str):
    return run([str(BIN / "advtrain"), *args], proj, check=False)


def test_new_data_trains_afresh_and_the_old_checkpoint_stays_under_its_own_key(tmp_path):
    proj = project(tmp_path, "direct")
    assert advtrain(proj, "prepare", "shapes").returncode == 0
    p = advtrain(proj, "train", "pgd", "shapes")
    assert p.returncode == 0 and FRESH.search(p.stdout), p.stdout + p.stderr
    first, first_digest, first_key = (proj / MODEL).read_bytes(), digest(proj), model_meta(proj)["fingerprint"]
    assert model_meta(proj)["data_sha256"] == first_digest

    remove_images(proj, 10, tmp_path / "stash")
    assert advtrain(proj, "prepare", "shapes").returncode == 0
    assert digest(proj) != first_digest
    p = advtrain(proj, "train", "pgd", "shapes")
    assert p.returncode == 0, p.stderr
    assert "finished: publishing it" not in p.stdout and FRESH.search(p.stdout), p.stdout
    meta = model_meta(proj)
    assert meta["data_sha256"] == digest(proj) and meta["fingerprint"] != first_key
    assert len(list((proj / "checkpoints/pgd_shapes_seed0").glob("*.pt"))) == 2  # the old data's is kept

    # a class added: a model with one more output, trained afresh (no size-mismatch traceback)
    shutil.copytree(proj / "data/raw/shapes/train/class0", proj / "data/raw/shapes/train/class4")
    assert advtrain(proj, "prepare", "shapes").returncode == 0
    p = advtrain(proj, "train", "pgd", "shapes")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert FRESH.search(p.stdout) and model_meta(proj)["num_classes"] == 5
    assert torch.load(proj / MODEL, weights_only=True)["model"]["net.classifier.3.weight"].shape[0] == 5

    # the first data again: its checkpoint is still there and its model is re-published byte for byte
    shutil.rmtree(proj / "data/raw/shapes/train/class4")
    for f in (tmp_path / "stash").iterdir():
        shutil.move(f, proj / "data/raw/shapes/train/class1" / f.name)
    assert advtrain(proj, "prepare", "shapes").returncode == 0
    assert digest(proj) == first_digest
    p = advtrain(proj, "train", "pgd", "shapes")
    assert p.returncode == 0 and "finished: publishing it" in p.stdout and not FRESH.search(p.stdout), p.stdout
    assert (proj / MODEL).read_bytes() == first


def test_snakemake_retrains_on_new_data_instead_of_republishing(tmp_path):
    proj = project(tmp_path, "snake")
    snakemake = [str(BIN / "snakemake"), "--cores", "2"]
    run([*snakemake, MODEL], proj)
    first = model_meta(proj)
    remove_images(proj, 10, tmp_path / "stash")
    run([*snakemake, "--forcerun", "prepare", "--", MODEL], proj)
    log = (proj / "logs/train/pgd_shapes_seed0.log").read_text()
    assert "finished: publishing it" not in log and FRESH.search(log), log
    meta = model_meta(proj)
    assert meta["data_sha256"] == digest(proj) != first["data_sha256"]
    assert meta["fingerprint"] != first["fingerprint"]


def test_dvc_repro_retrains_on_new_data_instead_of_republishing(tmp_path):
    proj = project(tmp_path, "dvc")
    dvc = str(BIN / "dvc")
    run([dvc, "repro", "train@pgd-shapes-0"], proj)
    first = model_meta(proj)
    remove_images(proj, 10, tmp_path / "stash")
    run([dvc, "repro", "--force", "--single-item", "prepare@shapes"], proj)
    out = run([dvc, "repro", "train@pgd-shapes-0"], proj).stdout
    assert "Running stage 'train@pgd-shapes-0'" in out, out
    log = (proj / "logs/train/pgd_shapes_seed0.log").read_text()
    assert "finished: publishing it" not in log and FRESH.search(log), log
    meta = model_meta(proj)
    assert meta["data_sha256"] == digest(proj) != first["data_sha256"]

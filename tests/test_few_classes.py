"""AutoAttack on datasets of 2, 3 and 4 classes: both versions complete, run every attack defined for the model, and
say in the result and the report which were skipped and why (APGD-T's targeted DLR loss needs 4 classes). A rerun
after a kill goes past the skipped attack too."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, deep_update, make_project, run
from imagefolder_data import make_image_folder

OVERLAY = deep_update(yaml.safe_load((ROOT / "tests/configs/imagefolder.yaml").read_text()), {
    "runs": {"methods": ["standard"]},
    "datasets": {"shapes": {"training": {"val_points": 0, "select": "last"}}},
    # only AutoAttack, in batches of 8 (a kill after the first batch leaves a state to resume from)
    "methods": {"standard": {"shapes": {"evaluation": {"n_points": 16, "batch_size": 8, "pgd_steps": 0,
                                                       "cw_steps": 0, "autoattack": "standard"}}}}})
FAST = {"methods": {"standard": {"shapes": {"evaluation": {"autoattack": "fast"}}}}}
RESULT = "results/seeds/standard_shapes/seed0.json"


def advtrain(proj: Path, *args: str, **kw):
    return run([str(BIN / "advtrain"), *args], proj, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[int, Path]:
    """One trained project per number of classes (the folder's classes beyond k removed)."""
    out = {}
    for k in (2, 3, 4):
        proj = make_project(tmp_path_factory.mktemp(f"classes{k}") / "p", OVERLAY)
        folder = make_image_folder(proj / "data/raw/shapes", n_train=96, n_test=16)
        for split in ("train", "val"):
            for extra in range(k, 4):
                shutil.rmtree(folder / split / f"class{extra}")
        (proj / "fast.yaml").write_text(yaml.safe_dump(FAST))
        advtrain(proj, "prepare", "shapes")
        advtrain(proj, "train", "standard", "shapes")
        out[k] = proj
    return out


@pytest.mark.parametrize("classes", [2, 3, 4])
def test_both_autoattack_versions_complete_and_name_what_they_skipped(trained, classes):
    proj = trained[classes]
    for version, params in (("standard", "params.yaml"), ("fast", "params.yaml,fast.yaml")):
        p = advtrain(proj, "--params", params, "evaluate", "standard", "shapes", check=False)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (version, p.stdout[-2000:], p.stderr[-3000:])
        aa = json.loads((proj / RESULT).read_text())["autoattack"]
        wanted = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"], "fast": ["apgd-ce", "apgd-t"]}[version]
        assert aa["version"] == version
        if classes < 4:
            assert aa["attacks"] == [a for a in wanted if a != "apgd-t"], aa
            assert list(aa["skipped"]) == ["apgd-t"] and "at least 4 classes" in aa["skipped"]["apgd-t"], aa
            assert f"this model has {classes}" in aa["skipped"]["apgd-t"]
            assert "apgd-t skipped" in p.stdout
        else:
            assert aa["attacks"] == wanted and aa["skipped"] == {}, aa
        assert list(aa["robust_acc_after"]) == aa["attacks"]
        assert 0 <= aa["robust_acc"] <= 1
    if classes == 3:  # the report says it too
        advtrain(proj, "aggregate", "standard", "shapes")
        advtrain(proj, "report")
        md = (proj / "reports/report.md").read_text()
        assert "- standard: apgd-t skipped: its targeted DLR loss needs" in md, md
        assert "apgd-t skipped" in (proj / "reports/report.html").read_text()


def test_a_killed_evaluation_resumes_past_the_attack_the_model_cannot_take(trained, tmp_path):
    proj = shutil.copytree(trained[3], tmp_path / "p")
    shutil.rmtree(proj / "checkpoints/eval", ignore_errors=True)  # no finished evaluation to re-publish
    killed = advtrain(proj, "evaluate", "standard", "shapes", check=False,
                      extra_env={"ADVTRAIN_FAULT": "evaluate.batch:1"})  # after APGD-CE's first batch
    assert killed.returncode == -9, (killed.stdout[-2000:], killed.stderr[-2000:])
    p = advtrain(proj, "evaluate", "standard", "shapes", check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, (p.stdout[-2000:], p.stderr[-3000:])
    assert "resuming from checkpoints/eval/standard_shapes_seed0/" in p.stdout and "apgd-t skipped" in p.stdout
    aa = json.loads((proj / RESULT).read_text())["autoattack"]
    assert aa["attacks"] == ["apgd-ce", "fab-t", "square"] and list(aa["skipped"]) == ["apgd-t"]

"""`advtrain prepare` of a streamed source killed part-way continues from the shards it had written, and ends
byte-identical to an uninterrupted prepare; unreadable images are all named at once."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from advtrain.config import Params
from advtrain.errors import UserError
from advtrain.prepared import prepare
from advtrain.sources import SOURCES
from conftest import BIN, ROOT, make_project, run
from imagefolder_data import make_image_folder

OVERLAY = yaml.safe_load((ROOT / "tests/configs/imagefolder.yaml").read_text())


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_killed_on_a_shard_resumes_from_the_shards_written_and_ends_byte_identical(tmp_path, monkeypatch):
    proj = make_project(tmp_path / "proj", OVERLAY)
    make_image_folder(proj / "data/raw/shapes")  # 240 training images: 4 shards of 64; 64 test images: 1 shard
    out = proj / "data/prepared/shapes"
    monkeypatch.chdir(proj)  # the uninterrupted reference, from the same settings (the source path is relative)
    prepare(Params.load(proj / "params.yaml").source("shapes"), tmp_path / "reference/shapes", tmp_path / "raw")
    monkeypatch.undo()

    def prepare_cli(fault: str | None = None):
        return run([str(BIN / "advtrain"), "prepare", "shapes"], proj, check=fault is None,
                   extra_env={"ADVTRAIN_FAULT": fault} if fault else None)

    killed = prepare_cli("write@train-00002.bin")  # SIGKILL before the third shard's rename
    assert killed.returncode == -9 and "[fault] SIGKILL at write train-00002.bin" in killed.stdout, killed.stdout
    assert "train: shard 2/4" in killed.stdout and not (out / "meta.json").exists()
    assert sorted(p.name for p in out.glob("*.bin")) == ["train-00000.bin", "train-00001.bin"]
    first = (out / "train-00000.bin").stat().st_mtime_ns

    killed = prepare_cli("write@test-00000.bin")  # killed again, in the test split
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "[prepare] train: shards 1-2 reused" in killed.stdout, killed.stdout
    assert "train: shard 1/4" not in killed.stdout and "train: shard 3/4" in killed.stdout

    damaged = bytearray((out / "train-00001.bin").read_bytes())  # a written shard altered: written again
    damaged[100] ^= 0xFF
    (out / "train-00001.bin").write_bytes(bytes(damaged))
    done = prepare_cli()
    assert "[prepare] train: shards 1, 3-4 reused" in done.stdout and "train: shard 2/4" in done.stdout, done.stdout
    assert "test: shard 1/1" in done.stdout
    assert (out / "train-00000.bin").stat().st_mtime_ns == first  # reused, not rewritten
    # nothing of the interrupted runs is left (records, temporary folders), and the rest is byte-identical
    assert files(out) == files(tmp_path / "reference/shapes")


def small_folder(root: Path) -> Path:
    return make_image_folder(root, n_train=40, n_test=8)  # 5 training shards of 8, 1 test shard


def source(root: Path):
    return SOURCES["imagefolder"]({**SOURCES["imagefolder"].defaults, "path": str(root), "size": 28,
                                   "shard_images": 8})


def test_every_unreadable_image_is_named_in_one_line_and_the_rest_is_kept(tmp_path, capsys):
    root = small_folder(tmp_path / "folder")
    good = (root / "train/class1/img0005.jpg").read_bytes()
    bad = {root / "train/class0/img0004.jpg": b"not an image",  # garbage, empty, a JPEG cut short
           root / "train/class2/img0010.jpg": b"",
           root / "val/class3/img0003.jpg": (root / "val/class3/img0003.jpg").read_bytes()[:300]}
    for path, data in bad.items():
        path.write_bytes(data)
    out = tmp_path / "prepared/folder"
    with pytest.raises(UserError) as e:
        prepare(source(root), out, tmp_path / "raw")
    message = str(e.value)
    assert "\n" not in message and message.startswith("3 unreadable images: ")
    for path in sorted(bad):
        assert str(path) in message
    assert message.index("img0004") < message.index("img0010")  # by path
    assert "replace (the shards already written are then reused) or delete them, then prepare again" in message
    assert not (out / "meta.json").exists() and not (out / "train.index.pt").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert 3 <= len(written) <= 4 and "test-00000.bin" not in written  # the shards without a bad image
    # with the files replaced, the next prepare writes only the shards that held them
    for path in bad:
        path.write_bytes(good)
    capsys.readouterr()
    meta = prepare(source(root), out, tmp_path / "raw")
    printed = capsys.readouterr().out
    assert (meta["n_train"], meta["n_test"]) == (40, 8) and "reused" in printed, printed
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written
    assert len(list(out.glob("*.bin"))) == 6 and not (out / ".prepare").exists()


def test_past_twenty_unreadable_images_the_rest_are_counted(tmp_path):
    root = small_folder(tmp_path / "folder")
    train = sorted((root / "train").rglob("*.jpg"))[:25]
    for path in train:
        path.write_bytes(b"junk")
    with pytest.raises(UserError) as e:
        prepare(source(root), tmp_path / "prepared/folder", tmp_path / "raw")
    message = str(e.value)
    assert message.startswith("25 unreadable images: ") and "; and 5 more: replace" in message
    assert sum(str(p) in message for p in train) == 20 and "\n" not in message

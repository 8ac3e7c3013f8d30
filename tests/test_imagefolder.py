"""Data that does not fit in memory: ImageFolder/ImageNet sources, sharded prepare, the streaming loader, resnet50."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from advtrain.config import Params
from advtrain.errors import UserError
from advtrain.loader import DeviceLoader
from advtrain.models import build_model
from advtrain.prepared import load_split, open_split, prepare
from advtrain.sources import SOURCES
from advtrain.prefetch import prefetched
from advtrain.stream import StreamLoader, crop_resize, resized_crop_boxes
from conftest import BIN, ROOT, deep_update, make_project, run
from imagefolder_data import make_image_folder

OVERLAY = yaml.safe_load((ROOT / "tests/configs/imagefolder.yaml").read_text())


def source(root: Path, **settings):
    return SOURCES["imagefolder"]({**SOURCES["imagefolder"].defaults, "path": str(root), "size": 28,
                                   "shard_images": 64, **settings})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder") / "shapes")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "shapes"
    prepare(source(folder), out, out.parent / "raw")
    return out


def test_prepare_is_byte_identical_and_reads_every_kind_of_file(folder, shards, tmp_path):
    meta = json.loads((shards / "meta.json").read_text())
    assert (meta["n_train"], meta["n_test"], meta["num_classes"], meta["store_size"]) == (240, 64, 4, 32)
    assert sorted(meta["splits"]["train"]["shards"]) == [f"train-0000{k}.bin" for k in range(4)]
    again = tmp_path / "shapes"
    prepare(source(folder), again, tmp_path / "raw")
    files = sorted(p.name for p in shards.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (shards / name).read_bytes() == (again / name).read_bytes(), name
    x, y, _ = load_split(shards, "train")
    assert x.shape == (240, 3, 28, 28) and x.dtype == torch.uint8 and sorted(set(y.tolist())) == [0, 1, 2, 3]
    # the grayscale JPEG came out as RGB with equal channels (JPEG rounding aside); no colour image does
    grey = ((x[:, 0].int() - x[:, 1].int()).abs().amax((1, 2)) <= 2) & ((x[:, 1].int() - x[:, 2].int()).abs()
                                                                           .amax((1, 2)) <= 2)
    assert grey.sum() == 1
    # the storage order is shuffled: the last images (validation) hold every class
    assert sorted(set(y[-32:].tolist())) == [0, 1, 2, 3]


def test_crop_resize_is_an_exact_crop_at_the_output_size_and_torchvisions_resize_otherwise():
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    box = torch.tensor([[2, 1, 8, 8], [0, 0, 8, 8], [-2, 3, 8, 8], [1, 2, 10, 6]])  # the third reaches into padding
    out = crop_resize(x, box, torch.tensor([False, True, False, True]), 8)
    assert out.dtype == torch.float32 and torch.equal(out[0], x[0, :, 1:9, 2:10] / 255)
    assert torch.equal(out[1], x[1, :, 0:8, 0:8].flip(2) / 255)
    assert torch.equal(out[2, :, :, 2:], x[2, :, 3:11, 0:6] / 255) and out[2, :, :, :2].abs().max() == 0
    expected = TF.resized_crop(x[3], 2, 1, 6, 10, [8, 8], antialias=True).flip(2)  # top, left, height, width
    assert torch.equal(out[3], expected / 255)


def test_resized_crop_boxes_follow_torchvision_and_the_seed():
    """Square 256 x 256 images here; tests/test_preprocessing.py checks other shapes against torchvision itself."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    hw = torch.tensor([[256, 256]]).repeat(4000, 1)  # each image's (height, width)
    box = resized_crop_boxes(hw, (0.08, 1.0), g())
    assert torch.equal(box, resized_crop_boxes(hw, (0.08, 1.0), g()))
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 256).all() and (y0 + h <= 256).all()
    area = w * h / 256 ** 2
    assert 0.07 < area.min() and area.max() <= 1.0 and 0.45 < area.mean() < 0.6  # U(0.08, 1): mean ~0.54
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4


def stream(shards, workers=0, seed=0, shard=None, rows=None):
    data, _ = open_split(shards, "train", {"stream": {"workers": workers, "decode": "cpu"}})
    rows = torch.arange(200) if rows is None else rows
    return StreamLoader(data.reader, rows, 32, "cpu", 28, {"resized_crop": [0.35, 1.0], "flip": True}, seed,
                        shard=shard)


def test_stream_is_a_function_of_the_seed_with_or_without_workers_and_resumes(shards):
    one = [(x.clone(), y.clone()) for x, y in stream(shards, workers=0)]
    two = list(stream(shards, workers=2))
    assert len(one) == 7 and one[0][0].shape == (32, 3, 28, 28) and one[-1][0].shape[0] == 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))
    assert 0 <= float(torch.cat([x for x, _ in one]).min()) and float(torch.cat([x for x, _ in one]).max()) <= 1
    # a run resumed from a checkpoint restores the loader's generator: the next epoch is the same stream
    loader = stream(shards)
    list(loader)
    saved = loader.generator.get_state()
    epoch2 = [x for x, _ in loader]
    resumed = stream(shards)
    resumed.generator.set_state(saved)
    assert all(torch.equal(a, b) for a, b in zip(epoch2, (x for x, _ in resumed)))
    assert not torch.equal(epoch2[0], one[0][0])  # and a new epoch is a new draw


def test_the_device_cropping_path_gives_the_workers_batches(shards):
    """The stage CUDA training takes without GPU decode ("decoded": the workers send each batch's whole images, of
    their own sizes, as one buffer; the training device crops) gives what the CPU path's workers crop themselves."""
    for workers in (0, 2):
        plain = [(x.clone(), y.clone()) for x, y in stream(shards, workers=workers)]
        device_side = stream(shards, workers=workers)
        device_side.stage = "decoded"
        for (a, y), (b, z) in zip(plain, device_side):
            assert torch.equal(a, b) and torch.equal(y, z)


def test_prefetched_finishes_one_batch_ahead_in_order():
    """The look-ahead order CUDA runs (finish(i + 1) is queued before batch i is handed over), run on the CPU: every
    batch once, in order, each finished before the one before it is handed over."""
    calls = []

    def finish(i):
        calls.append(("finish", i))
        return i, -i

    out = []
    for batch in prefetched(range(5), finish, torch.device("cpu"), ahead=True):
        calls.append(("yield", batch[0]))
        out.append(batch)
    assert out == [(i, -i) for i in range(5)]
    assert calls.index(("finish", 3)) < calls.index(("yield", 2)) < calls.index(("finish", 4))
    assert list(prefetched(range(3), finish, torch.device("cpu"))) == [(0, 0), (1, -1), (2, -2)]
    assert list(prefetched([], finish, torch.device("cpu"), ahead=True)) == []


def test_the_prefetched_stream_and_the_workers_uint8_are_the_same_batches(shards):
    """With the look-ahead on, a loader yields the same stream, resumes at a batch, and leaves its generator as
    without; what its workers send (uint8_batches) is that stream before the float conversion."""
    plain = [(x.clone(), y.clone()) for x, y in stream(shards, workers=2)]
    ahead = stream(shards, workers=2)
    ahead.ahead = True
    start = ahead.generator.get_state()
    assert all(torch.equal(a, c) and torch.equal(y, z) for (a, y), (c, z) in zip(plain, ahead, strict=True))
    end = ahead.generator.get_state()
    ahead.generator.set_state(start)
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(plain[3:], ahead.batches(3), strict=True))
    assert torch.equal(ahead.generator.get_state(), end)
    raw = stream(shards, workers=2)
    for (a, y), (u, z) in zip(plain, raw.uint8_batches(), strict=True):
        assert u.dtype == torch.uint8 and u.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, u.float() / 255) and torch.equal(y, z)


def test_an_epoch_resumed_at_a_batch_is_the_rest_of_the_same_epoch(shards):
    """What a checkpoint inside an epoch relies on (preemption.py): from the epoch's starting generator state,
    batches(k) yields batches k, k+1, ... of that epoch, and leaves the generator where the whole epoch leaves it."""
    x8 = torch.randint(0, 255, (70, 1, 8, 8), dtype=torch.uint8)
    for make in (lambda: stream(shards, workers=2), lambda: DeviceLoader(x8, torch.arange(70), 16, "cpu", crop=2,
                                                                         flip=True, seed=1)):
        loader = make()
        start = loader.generator.get_state()
        whole = [(x.clone(), y.clone()) for x, y in loader]
        end = loader.generator.get_state()
        resumed = make()
        resumed.generator.set_state(start)
        rest = list(resumed.batches(3))
        assert len(rest) == len(whole) - 3 > 0
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[3:], rest))
        assert torch.equal(resumed.generator.get_state(), end)


def test_two_ranks_read_the_two_halves_of_each_global_batch(shards):
    from advtrain.distributed import World

    whole = list(stream(shards))
    halves = []
    for rank in (0, 1):
        w = World()
        w.size, w.rank = 2, rank
        halves.append(list(stream(shards, shard=w.shard)))
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_in_memory_loader_shards_the_same_way():
    x = torch.randint(0, 255, (70, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(70)
    whole = list(DeviceLoader(x, y, 32, "cpu", crop=2, flip=True, seed=1))
    parts = [list(DeviceLoader(x, y, 32, "cpu", crop=2, flip=True, seed=1, shard=lambda n, r=r: slice(
        r * (n // 2), (r + 1) * (n // 2) if r == 0 else n))) for r in (0, 1)]
    for (a, b), (a0, b0), (a1, b1) in zip(whole, *parts):
        assert torch.equal(torch.cat([a0, a1]), a) and torch.equal(torch.cat([b0, b1]), b)


def test_a_damaged_shard_is_named_by_its_checksum(shards, tmp_path):
    copy = tmp_path / "shapes"
    shutil.copytree(shards, copy)
    shard = copy / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    train, _ = open_split(copy, "train", {"stream": {"workers": 0, "decode": "cpu"}})
    with pytest.raises(UserError, match=r"train-00001.bin: corrupt \(its sha256 does not match meta.json\): run "
                                        r"`advtrain prepare shapes` again"):
        train.loader(32, "cpu", {"flip": False, "crop": 0}, 0, False)


def test_resnet50_is_torchvisions_with_normalisation_inside():
    import torchvision

    model = build_model("resnet50", (3, 64, 64), 7, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    ours = set(model.net.state_dict())
    assert ours == set(torchvision.models.resnet50(num_classes=7).state_dict())
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)


def test_a_test_list_picks_the_test_images_in_its_order(folder, tmp_path):
    """RobustBench's ImageNet subset is such a list; lines may be relative to the test folder or to the root."""
    listing = tmp_path / "ids.txt"
    names = ["class2/img0002.jpg", "val/class0/img0004.jpg", "class1/img0009.jpg"]
    listing.write_text("\n".join(names) + "\n")
    listed = source(folder, test_list=str(listing)).list_files(tmp_path)
    assert [(Path(p).relative_to(folder / "val").as_posix(), k) for p, k in listed.test] == [
        ("class2/img0002.jpg", 2), ("class0/img0004.jpg", 0), ("class1/img0009.jpg", 1)]
    listing.write_text("class1/missing.jpg\n")
    with pytest.raises(UserError, match="ids.txt: lists class1/missing.jpg, which is not in"):
        source(folder, test_list=str(listing)).list_files(tmp_path)


def test_imagenet_reads_torchvisions_extracted_layout_with_the_devkits_class_names(folder, tmp_path):
    """torchvision's ImageNet layout (what it extracts from the archives after their md5): train/WNID, val/WNID and
    meta.bin (the devkit's WNID -> names); the classes are the WNIDs in order, named by the devkit."""
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    for split in ("train", "val"):
        for k, wnid in enumerate(wnids):
            shutil.copytree(folder / split / f"class{k}", root / split / wnid)
    torch.save(({w: (f"name {w}", "other name") for w in wnids}, []), root / "meta.bin")
    src = SOURCES["imagenet"]({**SOURCES["imagenet"].defaults, "path": str(root), "size": 28, "num_classes": 4})
    meta = prepare(src, tmp_path / "prepared" / "imagenet", tmp_path / "raw")
    assert meta["classes"] == [f"name {w}" for w in wnids] and (meta["n_train"], meta["n_test"]) == (240, 64)
    x, y, _ = load_split(tmp_path / "prepared" / "imagenet", "test")
    assert x.shape == (64, 3, 28, 28) and torch.bincount(y).tolist() == [16, 16, 16, 16]


def test_imagenet_without_archives_says_which_files_go_where(tmp_path):
    proj = make_project(tmp_path / "inet")
    p = run([str(BIN / "advtrain"), "prepare", "imagenet"], proj, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert ("imagenet: ILSVRC2012_img_train.tar (138 GB), ILSVRC2012_img_val.tar (6.3 GB), "
            "ILSVRC2012_devkit_t12.tar.gz (2.5 MB) not found in data/raw/imagenet") in lines[0]
    assert not (proj / "data/prepared/imagenet/meta.json").exists()
    plan = run([str(BIN / "snakemake"), "-n", "--cores", "8", "results/deat_imagenet.json"], proj).stdout
    for job in ("prepare", "train", "evaluate", "aggregate"):
        assert f"rule {job}:" in plan or f"localrule {job}:" in plan, plan[-2000:]
    for line in ("advtrain --log logs/train/deat_imagenet_seed0.log train deat imagenet --seed 0",
                 "advtrain --log logs/prepare/imagenet.log prepare imagenet"):
        assert line in plan
    cfg = Params.load(str(proj / "params.yaml")).resolve("deat", "imagenet")
    assert (cfg.model, cfg.info["shape"], cfg.info["classes"], cfg.training["batch_size"]) == ("resnet50",
                                                                                                (3, 224, 224), 1000,
                                                                                                256)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    """prepare -> train (PGD-AT and DEAT, one epoch) -> evaluate -> report on a folder of real image files."""
    proj = make_project(tmp_path_factory.mktemp("imagefolder") / "proj", OVERLAY)
    make_image_folder(proj / "data/raw/shapes")
    run([str(BIN / "snakemake"), "--cores", "2", "results/pgd_shapes.json", "results/deat_shapes.json",
         "reports/report.html"], proj)
    return proj


def test_image_folder_through_snakemake_prepare_train_evaluate_report(workflow):
    meta = json.loads((workflow / "data/prepared/shapes/meta.json").read_text())
    assert meta["format"] == "shards" and meta["n_train"] == 240
    for method in ("pgd", "deat"):
        result = json.loads((workflow / f"results/{method}_shapes.json").read_text())
        assert result["n_points"] == 64 and result["clean_acc"] > 0.5  # 4 classes: chance is 0.25
        assert "apgd-t" in result["autoattack"]["robust_acc_after"]  # AutoAttack's targeted attack on 4 classes
        metrics = json.loads((workflow / f"metrics/train/{method}_shapes_seed0.json").read_text())
        assert metrics["epochs"][0]["images_per_s"] > 0 and metrics["totals"]["epochs"] == 1
    report = (workflow / "reports/report.html").read_text()
    assert "<h2>shapes</h2>" in report and "<td><b>deat</b>" in report and "<td><b>pgd</b>" in report


def test_two_ranks_stream_what_one_process_streams(workflow, tmp_path):
    """PGD-AT under torchrun on 2 ranks, each reading its half of every global batch from the shards, ends at the
    one-process model of the workflow (float sums in another order aside: see test_distributed.py)."""
    proj = make_project(tmp_path / "two", deep_update(OVERLAY, {"datasets": {"shapes": {"training": {"devices": 2}}}}))
    shutil.copytree(workflow / "data", proj / "data")
    out = run([str(BIN / "advtrain"), "train", "pgd", "shapes"], proj).stdout
    assert "--nproc-per-node=2" in out
    a = torch.load(workflow / "models/pgd_shapes_seed0.pt", weights_only=True)["model"]
    b = torch.load(proj / "models/pgd_shapes_seed0.pt", weights_only=True)["model"]
    for k in a:
        assert (a[k].float() - b[k].float()).norm() <= 1e-3 * a[k].float().norm() + 1e-6, k


def test_a_truncated_shard_stops_training_in_one_line_and_loses_nothing(workflow, tmp_path):
    proj = tmp_path / "copy"
    shutil.copytree(workflow, proj)
    before = {p: p.read_bytes() for d in ("models", "results") for p in (proj / d).rglob("*") if p.is_file()}
    shard = proj / "data/prepared/shapes/train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    p = run([str(BIN / "advtrain"), "train", "pgd", "shapes", "--restart"], proj, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-00002.bin: truncated or altered (1000 bytes, meta.json says" in lines[0], p.stderr
    assert "snakemake --cores 1 --force data/prepared/shapes/meta.json" in lines[0]
    assert before == {p: p.read_bytes() for d in ("models", "results") for p in (proj / d).rglob("*") if p.is_file()}


def test_pad_and_crop_on_streamed_data_shifts_whole_pixels(shards):
    data, _ = open_split(shards, "train", {"stream": {"workers": 0, "decode": "cpu"}})
    loader = StreamLoader(data.reader, torch.arange(64), 32, "cpu", 28, {"crop": 4, "flip": False}, 0)
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [32, 32] and float(batches[0][0].min()) >= 0

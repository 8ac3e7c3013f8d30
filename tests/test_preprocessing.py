"""The sharded ImageFolder/ImageNet preprocessing against torchvision's, on ImageNet-size images of every shape and
mode: evaluation = Resize(S) + CenterCrop(s) on the PIL image as ImageFolder loads it; training = RandomResizedCrop's
box sampling over the whole image."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from advtrain.prepared import load_split, open_split, prepare
from advtrain.shards import storage_order
from advtrain.sources import SOURCES
from advtrain.stream import (ATTEMPTS, LOG_RATIO, StreamLoader, boxes_from_draws, centre, crop_draws, crop_resize,
                             resized_crop_boxes, shifted_boxes)
from imagefolder_data import PHOTO_SIZES, make_photo_folder

# The stored JPEG's evaluation crops against torchvision's, in /255 units, on make_photo_folder's images (measured:
# see README, "Resize policy"): quality 90 re-encoding, and at small store sizes the DCT draft decoding
JPEG_TOLERANCE = {256: (0.02, 0.2), 73: (0.04, 0.4)}  # store_size: (mean, max) absolute difference


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "photos")


def source(folder: Path, size: int, store_size: int, encoding: str):
    return SOURCES["imagefolder"]({**SOURCES["imagefolder"].defaults, "path": str(folder), "size": size,
                                   "store_size": store_size, "encoding": encoding, "shard_images": 8})


@pytest.fixture(scope="module")
def photos_prepared(folder, tmp_path_factory):
    """(size, store_size, encoding) -> the prepared folder, made once."""
    made = {}

    def get(size: int, store_size: int, encoding: str) -> Path:
        key = (size, store_size, encoding)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{encoding}{store_size}") / "photos"
            prepare(source(folder, *key), out, out.parent / "raw")
            made[key] = out
        return made[key]

    return get


def stored_files(folder: Path, split: str, size: int = 224) -> list[str]:
    """The split's image files in storage order."""
    listed = source(folder, size, 256, "raw").list_files(folder)
    files = listed.train if split == "train" else listed.test
    return [files[i][0] for i in storage_order(len(files)).tolist()]


def torchvision_eval(path: str, store_size: int, size: int) -> torch.Tensor:
    from torchvision import transforms

    with Image.open(path) as img:  # as torchvision's ImageFolder loader opens it
        rgb = img.convert("RGB")
    return transforms.Compose([transforms.Resize(store_size), transforms.CenterCrop(size),
                               transforms.PILToTensor()])(rgb)


@pytest.mark.parametrize("store_size,size", [(256, 224), (257, 224), (73, 64)])
def test_raw_evaluation_pixels_are_torchvisions_resize_and_center_crop(folder, photos_prepared, store_size, size):
    """257: odd margins, where CenterCrop rounds (x.5 to even); 73 -> 64: reductions of 4-7x."""
    out = photos_prepared(size, store_size, "raw")
    for split in ("train", "test"):  # the test split for evaluation, the training split's tail for validation
        x, _, _ = load_split(out, split)
        files = stored_files(folder, split, size)
        assert x.shape == (len(files), 3, size, size)
        for img, path in zip(x, files):
            assert torch.equal(img, torchvision_eval(path, store_size, size)), path


@pytest.mark.parametrize("store_size,size", [(256, 224), (73, 64)])
def test_jpeg_evaluation_pixels_are_within_the_stated_difference(folder, photos_prepared, store_size, size):
    out = photos_prepared(size, store_size, "jpeg")
    x, _, _ = load_split(out, "test")
    ref = torch.stack([torchvision_eval(p, store_size, size) for p in stored_files(folder, "test", size)])
    diff = (x.float() - ref.float()).abs() / 255
    mean, most = JPEG_TOLERANCE[store_size]
    print(f"jpeg, store_size {store_size}: mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() <= mean and diff.max() <= most


def test_the_index_records_each_whole_images_stored_size(folder, photos_prepared):
    reader = open_split(photos_prepared(224, 256, "raw"), "train")[0].reader
    for (h, w), path in zip(reader.hw.tolist(), stored_files(folder, "train")):
        with Image.open(path) as img:
            width, height = img.size
        short, long = min(width, height), max(width, height)
        expect = (256, int(256 * long / short))  # torchvision: int(size * long / short)
        assert (w, h) == (expect[::-1] if width >= height else expect), path


class TorchvisionDraws:
    """Stands in for `torch` inside torchvision.transforms.transforms: torchvision's RandomResizedCrop.get_params
    then takes crop_draws' numbers of one image instead of its own: per attempt the area fraction, then the log
    aspect ratio (torch.empty(1).uniform_), and on success the top and the left (torch.randint)."""

    def __init__(self, fraction, log_ratio, position, scale):
        self.values = iter(v for pair in zip(fraction.tolist(), log_ratio.tolist()) for v in pair)
        self.position, self.scale, self.draws, self.ints = position, scale, 0, 0

    def empty(self, *size):
        return self

    def uniform_(self, lo, hi):
        expect = self.scale if self.draws % 2 == 0 else LOG_RATIO
        assert abs(float(lo) - expect[0]) < 1e-6 and abs(float(hi) - expect[1]) < 1e-6
        self.draws += 1
        return torch.tensor([next(self.values)], dtype=torch.float32)

    def randint(self, low, high, size):
        attempt = self.draws // 2 - 1
        value = math.floor(float(self.position[attempt, self.ints]) * high)
        self.ints += 1
        return torch.tensor([value])

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.35, 1.0), (0.9, 1.0)])
def test_training_boxes_are_torchvisions_get_params_given_the_same_draws(monkeypatch, scale):
    """(0.9, 1): on images beyond 4:3 or 3:4 no draw fits, and torchvision's central-crop fallback is taken."""
    import torchvision.transforms.transforms as tvt

    g = torch.Generator().manual_seed(1)
    sizes = PHOTO_SIZES + [(256, 256), (256, 600), (600, 256), (256, 341), (341, 256)]
    hw = torch.tensor([(h, w) for w, h in sizes]).repeat(60, 1)
    draws = crop_draws(len(hw), scale, g)
    ours = boxes_from_draws(hw, *draws).long()
    fallbacks = 0
    for i, (h, w) in enumerate(hw.tolist()):
        shim = TorchvisionDraws(draws[0][i], draws[1][i], draws[2][i], scale)
        monkeypatch.setattr(tvt, "torch", shim)
        top, left, bh, bw = tvt.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
        monkeypatch.undo()
        fallbacks += shim.draws == 2 * ATTEMPTS and shim.ints == 0
        assert ours[i].tolist() == [left, top, bw, bh], (i, h, w)
    assert fallbacks > 0 if scale[0] == 0.9 else True


def test_training_boxes_span_the_whole_image_with_torchvisions_area_and_ratio():
    """The boxes' distribution against torchvision's own get_params (its own random numbers) on 3:2 images, where
    draws above about 0.67 x the aspect ratio do not fit and are drawn again (the mean area is below U(0.08, 1)'s)."""
    from torchvision.transforms import RandomResizedCrop

    g = torch.Generator().manual_seed(0)
    n = 4000
    for h, w in ((256, 384), (384, 256)):  # landscape, portrait
        box = resized_crop_boxes(torch.tensor([[h, w]]).repeat(n, 1), (0.08, 1.0), g)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                                for _ in range(n)], dtype=torch.float32)[:, [1, 0, 3, 2]]  # -> x0, y0, w, h
        for b in (box, ref):
            x0, y0, bw, bh = b.unbind(1)
            assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + bw <= w).all() and (y0 + bh <= h).all()
        area, ref_area = box[:, 2] * box[:, 3] / (h * w), ref[:, 2] * ref[:, 3] / (h * w)  # of the whole image
        assert 0.079 < area.min() and area.max() <= 0.9 and ref_area.max() <= 0.9
        ratio, ref_ratio = box[:, 2] / box[:, 3], ref[:, 2] / ref[:, 3]
        assert 0.74 <= ratio.min() and ratio.max() <= 1.35
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        assert (area.quantile(q) - ref_area.quantile(q)).abs().max() < 0.03
        assert (ratio.quantile(q) - ref_ratio.quantile(q)).abs().max() < 0.03
        # the boxes reach every edge of the whole image, beyond the central square's
        x0, y0, bw, bh = box.unbind(1)
        assert x0.min() == 0 and (x0 + bw).max() == w and y0.min() == 0 and (y0 + bh).max() == h
        side = min(h, w)
        outside = ((x0 < (w - side) // 2) | (x0 + bw > (w + side) // 2) | (y0 < (h - side) // 2)
                   | (y0 + bh > (h + side) // 2))
        assert outside.float().mean() > 0.3


def test_training_crops_of_images_of_different_sizes_are_torchvisions_resized_crop(photos_prepared):
    from torchvision.transforms.v2 import functional as TF

    data, _ = open_split(photos_prepared(224, 256, "raw"), "train")
    reader = data.reader
    rows = torch.arange(len(reader))
    images = reader.decode(rows)
    assert len({tuple(x.shape) for x in images}) > 3  # a batch of several stored sizes
    box = resized_crop_boxes(reader.hw[rows], (0.08, 1.0), torch.Generator().manual_seed(0))
    out = crop_resize(images, box, None, 224)
    assert out.shape == (len(rows), 3, 224, 224)
    for img, b, o in zip(images, box.long().tolist(), out):
        x0, y0, w, h = b
        assert torch.equal(o, TF.resized_crop(img, y0, x0, h, w, [224, 224], antialias=True) / 255)
    # the plain crop (augment.crop 0) is the evaluation's centre crop; shifted by pad, still 224 x 224
    plain = crop_resize(images, shifted_boxes(reader.hw[rows], 224, 0, None), None, 224)
    assert torch.equal(plain, centre(reader, rows, 224)[0] / 255)
    shifted = crop_resize(images, shifted_boxes(reader.hw[rows], 224, 16, torch.Generator().manual_seed(0)), None, 224)
    assert shifted.shape == plain.shape and not torch.equal(shifted, plain)
    # and the loader streams them, in batches of several sizes
    loader = StreamLoader(reader, rows, 8, "cpu", 224, {"resized_crop": [0.08, 1.0], "flip": True}, 0, workers=0)
    assert [tuple(x.shape) for x, _ in loader] == [(8, 3, 224, 224), (8, 3, 224, 224), (4, 3, 224, 224)]

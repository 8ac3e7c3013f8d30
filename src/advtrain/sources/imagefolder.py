"""Any image folder in torchvision's ImageFolder layout: PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg.

Streamed: `advtrain prepare` resizes every image once into shards (shards.py states the resize policy) and training
streams them (stream.py). Files are found as torchvision's ImageFolder finds them (its extensions, classes = the
sorted sub-folders of the train folder). Settings (datasets.<name>.source):
  path          the folder (required here; ImageNet has a default)
  size          the model's input side s (square); store_size S: the stored images' shorter side (default
                round(8 s / 7), i.e. 256 for 224, as Resize(256) + CenterCrop(224))
  encoding      jpeg (quality `quality`) | raw (uint8 pixels: no decode, 3 S^2 bytes per image)
  shard_images  images per shard file
  test_list     a text file of test images relative to the test folder (e.g. RobustBench's 5,000 ImageNet ids)
  workers       DataLoader workers per rank that read and decode (default: the CPUs this job may use per rank,
                at most 8)
  decode        auto (on the GPU when training on CUDA) | cpu | cuda"""
from __future__ import annotations

import os
from pathlib import Path

from ..cpus import usable_cpus
from ..errors import UserError
from ..schema import ConfigError, choice, integer, optional, text
from ..shards import Encoding
from .base import Listed, Source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolder(Source):
    name = "imagefolder"
    streamed = True
    mean = IMAGENET_MEAN  # torchvision's ImageNet statistics: the usual choice for natural photographs
    std = IMAGENET_STD
    params = {"path": optional(text), "train": text, "test": text, "size": integer(8), "store_size": optional(integer(8)),
              "encoding": choice("jpeg", "raw"), "quality": integer(50, 100), "shard_images": integer(1),
              "num_classes": optional(integer(2)), "test_list": optional(text), "workers": optional(integer(0)),
              "decode": choice("auto", "cpu", "cuda")}
    defaults = {"path": None, "train": "train", "test": "val", "size": 64, "store_size": None, "encoding": "jpeg",
                "quality": 90, "shard_images": 1000, "num_classes": None, "test_list": None, "workers": None,
                "decode": "auto"}

    def __init__(self, settings: dict | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self.shape = (3, s["size"], s["size"])
        self.store_size = s["store_size"] or round(s["size"] * 8 / 7)
        if self.store_size < s["size"]:
            raise ConfigError(f"{self.name} source: store_size {self.store_size} is smaller than size {s['size']}: "
                              "the stored images must hold the model's input")

    def root(self, raw_dir: Path) -> Path:
        if not self.settings["path"]:
            raise ConfigError(f"{self.name} source: `path` is missing: set datasets.<name>.source.path to a folder "
                              "laid out as PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg")
        return Path(self.settings["path"])

    @property
    def num_classes(self) -> int:
        if self.settings["num_classes"]:
            return self.settings["num_classes"]
        folder = self.root(Path("data/raw")) / self.settings["train"]
        if not folder.is_dir():
            raise ConfigError(f"{self.name} source: {folder} does not exist: create it (one sub-folder per class) or "
                              "set datasets.<name>.source.num_classes")
        return len([d for d in os.scandir(folder) if d.is_dir()])

    def info(self) -> dict:
        return {**super().info(), "stream": {"workers": self.workers(), "decode": self.settings["decode"]}}

    def workers(self) -> int:
        """The setting, else the CPUs this process may use (cpus.usable_cpus) shared among the ranks on this machine
        (torchrun's LOCAL_WORLD_SIZE), at most 8 per rank."""
        if self.settings["workers"] is not None:
            return self.settings["workers"]
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, min(8, usable_cpus() // ranks))

    def encoding(self) -> Encoding:
        return Encoding(self.store_size, self.settings["encoding"], self.settings["quality"])

    def list_files(self, raw_dir: Path) -> Listed:
        root = self.root(raw_dir)
        train, test = root / self.settings["train"], root / self.settings["test"]
        for folder in (train, test):
            if not folder.is_dir():
                raise UserError(f"{folder}: missing: an ImageFolder dataset needs {train}/CLASS/*.jpg and "
                                f"{test}/CLASS/*.jpg (set datasets.<name>.source.path)")
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        try:
            classes, to_index = find_classes(str(train))
        except FileNotFoundError:
            raise UserError(f"{train}: no class folders in it: an ImageFolder dataset needs {train}/CLASS/*.jpg") \
                from None
        train_files = make_dataset(str(train), to_index, IMG_EXTENSIONS, allow_empty=True)
        empty = sorted(set(classes) - {classes[k] for _, k in train_files})
        if empty:  # torchvision's own refusal is a FileNotFoundError traceback
            raise UserError(f"{train / empty[0]}: no images (extensions {', '.join(IMG_EXTENSIONS)})"
                            + (f", nor in {len(empty) - 1} more class folders" if len(empty) > 1 else "")
                            + ": put the class's images there, or remove the empty folder")
        if self.settings["test_list"]:
            test_files = self.listed_test(test, to_index)
        else:
            test_files = make_dataset(str(test), to_index, IMG_EXTENSIONS, allow_empty=True)
            extra = sorted({d.name for d in os.scandir(test) if d.is_dir()} - set(classes))
            if extra:
                raise UserError(f"{test}: class folders {extra[:5]} are not in {train}: the test split must use the "
                                "training split's classes")
        if not test_files:
            raise UserError(f"{test}: no images found (extensions {', '.join(IMG_EXTENSIONS)})")
        return Listed(train_files, test_files, classes, {"how": "image folder", "path": str(root)})

    def listed_test(self, test: Path, to_index: dict[str, int]) -> list[tuple[str, int]]:
        """The test images a list file names (one path per line, relative to the test folder), in its order."""
        listing = Path(self.settings["test_list"])
        if not listing.exists():
            raise UserError(f"{listing}: the test_list file is missing: put it there or unset "
                            "datasets.<name>.source.test_list")
        files = []
        for line in listing.read_text().split():
            rel = Path(line)
            if rel.parts and rel.parts[0] == test.name and not (test / rel).exists():
                rel = Path(*rel.parts[1:])  # lists written relative to the dataset root ("val/CLASS/file")
            if not (test / rel).exists():
                raise UserError(f"{listing}: lists {line}, which is not in {test}")
            if rel.parent.name not in to_index:
                raise UserError(f"{listing}: {line}'s class folder {rel.parent.name!r} is not a training class")
            files.append((str(test / rel), to_index[rel.parent.name]))
        return files

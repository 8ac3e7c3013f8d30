"""The contract between `advtrain prepare` and a data source.

A source knows where a dataset comes from and what it is: image shape, classes, the per-channel mean/std the model's
normalisation layer uses, the checksums that prove a copy is the published one, and how to read it. Two kinds:
- in memory (CIFAR, Fashion-MNIST): `fetch` returns both splits as uint8 tensors; `advtrain prepare` (prepared.py)
  validates them and writes them whole;
- streamed (`streamed = True`; ImageFolder, ImageNet): `list_files` returns the image files of both splits, and
  prepare encodes them into shards (shards.py) that training streams (stream.py).
Adding a dataset = one new file here + one line in SOURCES (sources/__init__.py)."""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from ..lazy import torch
from ..schema import Check


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)


@dataclass
class Fetched:
    train: Split
    test: Split
    classes: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)  # where it came from and the checksums verified


@dataclass
class Listed:
    """A streamed source's image files: (path, class index) per split, in a fixed order."""
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def network_timeout() -> Iterator[float]:
    """Downloads give up after $ADVTRAIN_DOWNLOAD_TIMEOUT seconds (default 60) without an answer, instead of hanging on
    a network that accepts connections but never replies."""
    seconds = float(os.environ.get("ADVTRAIN_DOWNLOAD_TIMEOUT", 60))
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield seconds
    finally:
        socket.setdefaulttimeout(old)


class Source:
    name: ClassVar[str]
    shape: ClassVar[tuple[int, int, int]]  # (C, H, W)
    num_classes: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    sizes: ClassVar[dict[str, int] | None] = None  # {"train": N, "test": M} when known before fetching
    params: ClassVar[dict[str, Check]] = {}  # the source's own settings (datasets.<name>.source), validated on load
    defaults: ClassVar[dict[str, Any]] = {}
    streamed: ClassVar[bool] = False  # True: list_files() and shards; False: fetch() and tensors in memory

    def __init__(self, settings: dict | None = None) -> None:
        self.settings = {**self.defaults, **(settings or {})}

    def info(self) -> dict:
        """What a model of this data is built from: shape, number of classes, normalisation."""
        return {"shape": tuple(self.shape), "classes": self.num_classes, "mean": tuple(self.mean), "std": tuple(self.std)}

    def expected_images(self) -> int | None:
        """Images in both splits, when known before preparing (a cluster's `prepare` job is sized from it)."""
        return sum(self.sizes.values()) if self.sizes else None

    def fetch(self, raw_dir: Path) -> Fetched:
        """Both splits, verified against the published checksums; a UserError names what is wrong and the fix."""
        raise NotImplementedError

    def list_files(self, raw_dir: Path) -> Listed:
        """A streamed source's files, verified where checksums exist; a UserError names what is wrong and the fix."""
        raise NotImplementedError

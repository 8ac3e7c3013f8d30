"""The prepared format every later stage reads: a source's splits, verified, as uint8 tensors.

data/prepared/<dataset>/:
  train.pt, test.pt   {"images": uint8 (N, C, H, W), "labels": int64 (N,)}
  meta.json           shape, classes, the source and its checksums, sha256 of train.pt and test.pt (written last)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .errors import UserError
from .io import save_torch, sha256_file, write_json
from .sources import Source


def prepare(source: Source, out_dir: str | os.PathLike, raw_dir: str | os.PathLike = "data/raw") -> dict:
    """Fetch `source`, check what it gave, and write the prepared folder; returns its meta.json."""
    out_dir, raw_dir = Path(out_dir), Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fetched = source.fetch(raw_dir)
    shape = tuple(source.shape)
    for split, d in (("train", fetched.train), ("test", fetched.test)):
        if tuple(d.images.shape[1:]) != shape or d.images.dtype != torch.uint8 or len(d.labels) != len(d.images):
            raise UserError(f"{source.name} {split}: got images {tuple(d.images.shape)} {d.images.dtype}, expected "
                            f"(N, {', '.join(map(str, shape))}) uint8 with one label each: the source is corrupt")
    # meta.json is written last: a prepare killed half-way leaves no meta.json, and load_split refuses the folder.
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split, d in (("train", fetched.train), ("test", fetched.test)):
        save_torch(out_dir / f"{split}.pt", {"images": d.images, "labels": d.labels})
    meta = {
        "dataset": out_dir.name,
        "shape": list(shape),
        "num_classes": source.num_classes,
        "classes": fetched.classes,
        "n_train": len(fetched.train.labels),
        "n_test": len(fetched.test.labels),
        "sha256": {"train.pt": sha256_file(out_dir / "train.pt"), "test.pt": sha256_file(out_dir / "test.pt")},
        "source": fetched.provenance,
    }  # no time stamp or duration: the same source gives a byte-identical folder, so DVC sees nothing changed
    write_json(out_dir / "meta.json", meta)
    return {**meta, "seconds": time.time() - t0}


def load_split(prepared_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, int64 labels, meta) of a prepared split, after checking its sha256 against meta.json."""
    d = Path(prepared_dir)
    fix = f"run `advtrain prepare {d.name}` (or `snakemake --cores 1 --force {d}/meta.json`)"
    meta_path = d / "meta.json"
    if not meta_path.exists():
        raise UserError(f"{meta_path}: missing, the dataset is not prepared: {fix}")
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"][f"{split}.pt"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{meta_path}: corrupt ({e}): {fix}") from None
    path = d / f"{split}.pt"
    if not path.exists():
        raise UserError(f"{path}: missing: {fix}")
    if sha256_file(path) != expected:
        raise UserError(f"{path}: corrupt (its sha256 does not match meta.json): {fix}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["images"], obj["labels"], meta

"""The prepared format every later stage reads: a source's splits, verified.

In-memory sources, data/prepared/<dataset>/:
  train.pt, test.pt   {"images": uint8 (N, C, H, W), "labels": int64 (N,)}
  meta.json           shape, classes, the source and its checksums, sha256 of train.pt and test.pt (written last)
Streamed sources: shards of resized images (shards.py), and the same meta.json with "format": "shards"; a killed
prepare of shards continues from the shards it had written (shards.write_split).
Either way meta.json is written last: a prepare killed half-way leaves no meta.json, and the readers refuse it."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from .cpus import usable_cpus
from .errors import UserError
from .io import save_torch, sha256_file, write_json
from .lazy import torch
from .loader import InMemory
from .paths import split_identity
from .shards import RECORDS, RESIZE_POLICY, UNREADABLE_LISTED, ShardReader, split_digest, write_split
from .sources import Source
from .stream import ShardedData, centre


def prepare(source: Source, out_dir: str | os.PathLike, raw_dir: str | os.PathLike = "data/raw") -> dict:
    """Fetch `source`, check what it gave, and write the prepared folder; returns its meta.json."""
    out_dir, raw_dir = Path(out_dir), Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if source.streamed:
        return {**prepare_shards(source, out_dir, raw_dir), "seconds": time.time() - t0}
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


def prepare_shards(source: Source, out_dir: Path, raw_dir: Path) -> dict:
    listed = source.list_files(raw_dir)
    if source.settings["num_classes"] and len(listed.classes) != source.num_classes:
        raise UserError(f"{source.name}: {len(listed.classes)} classes found, but num_classes is "
                        f"{source.num_classes}: correct datasets.<name>.source.num_classes")
    enc = source.encoding()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for left in out_dir.glob(".*.*"):  # the temporary folders of writes a killed prepare left (io.atomic_path)
        if left.is_dir() and re.fullmatch(r"\.(.+-\d{5}\.bin|.+\.index\.pt|meta\.json)\.[^.]+", left.name):
            shutil.rmtree(left, ignore_errors=True)
    workers = min(usable_cpus(), 16)
    unreadable: list[tuple[str, str]] = []
    splits = {split: write_split(out_dir, split, files, enc, source.settings["shard_images"], workers, unreadable)
              for split, files in (("train", listed.train), ("test", listed.test))}
    if unreadable:
        raise UserError(unreadable_message(unreadable))
    keep = {name for e in splits.values() for name in [*e["shards"], e["index"]["name"]]}
    for stale in out_dir.glob("*-*.bin"):  # shards of an earlier, larger prepare
        if stale.name not in keep:
            stale.unlink()
    meta = {
        "dataset": out_dir.name,
        "format": "shards",
        "shape": list(source.shape),
        "num_classes": len(listed.classes),
        "classes": listed.classes,
        "n_train": splits["train"]["images"],
        "n_test": splits["test"]["images"],
        "size": source.shape[-1],
        "store_size": enc.store_size,
        "encoding": enc.kind,
        "quality": enc.quality if enc.kind == "jpeg" else None,
        "resize": RESIZE_POLICY,
        "splits": splits,
        "sha256": {split: split_digest(e) for split, e in splits.items()},
        "source": listed.provenance,
    }
    write_json(out_dir / "meta.json", meta)
    shutil.rmtree(out_dir / RECORDS, ignore_errors=True)  # finished: meta.json and the indexes hold it all
    return meta


def unreadable_message(unreadable: list[tuple[str, str]]) -> str:
    """One line naming the unreadable images (the first UNREADABLE_LISTED by path, then a count)."""
    listed = sorted(unreadable)
    named = "; ".join(f"{path} ({reason})" for path, reason in listed[:UNREADABLE_LISTED])
    more = f"; and {len(listed) - UNREADABLE_LISTED} more" if len(listed) > UNREADABLE_LISTED else ""
    return (f"{len(listed)} unreadable image{'s' if len(listed) > 1 else ''}: {named}{more}: replace (the shards "
            "already written are then reused) or delete them, then prepare again")


def read_meta(d: Path) -> tuple[dict, str]:
    """meta.json of a prepared folder and the fix to name when something in it is wrong."""
    fix = f"run `advtrain prepare {d.name}` (or `snakemake --cores 1 --force {d}/meta.json`)"
    meta_path = d / "meta.json"
    if not meta_path.exists():
        raise UserError(f"{meta_path}: missing, the dataset is not prepared: {fix}")
    try:
        return json.loads(meta_path.read_text()), fix
    except ValueError as e:
        raise UserError(f"{meta_path}: corrupt ({e}): {fix}") from None


def data_digest(meta: dict, split: str) -> str:
    """The sha256 that identifies a prepared split."""
    return split_identity(Path("."), meta, split)[1]


def open_split(prepared_dir: str | os.PathLike, split: str, info: dict | None = None):
    """A prepared split as training data (loader.InMemory or stream.ShardedData) and its meta."""
    d = Path(prepared_dir)
    meta, _ = read_meta(d)
    if meta.get("format") == "shards":
        stream = (info or {}).get("stream", {"workers": 0, "decode": "cpu"})
        reader = _reader(d, split, meta)
        return ShardedData(reader, meta["size"], stream["workers"], stream["decode"]), meta
    images, labels, meta = load_split(d, split)
    return InMemory(images, labels), meta


def _reader(d: Path, split: str, meta: dict) -> ShardReader:
    try:
        reader = ShardReader(d, split, meta)
    except KeyError as e:
        raise UserError(f"{d / 'meta.json'}: corrupt (no {e}): run `advtrain prepare {d.name}` again") from None
    reader.check_sizes()
    return reader


def load_split(prepared_dir: str | os.PathLike, split: str,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, int64 labels, meta) of a prepared split (its first `limit` images), after checking its sha256
    against meta.json. Sharded splits: the central crops the model takes."""
    d = Path(prepared_dir)
    meta, fix = read_meta(d)
    if meta.get("format") == "shards":
        reader = _reader(d, split, meta)
        rows = torch.arange(min(limit or len(reader), len(reader)))
        return (*centre(reader, rows, meta["size"]), meta)
    try:
        expected = meta["sha256"][f"{split}.pt"]
    except KeyError as e:
        raise UserError(f"{d / 'meta.json'}: corrupt ({e}): {fix}") from None
    path = d / f"{split}.pt"
    if not path.exists():
        raise UserError(f"{path}: missing: {fix}")
    if sha256_file(path) != expected:
        raise UserError(f"{path}: corrupt (its sha256 does not match meta.json): {fix}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    n = limit or len(obj["labels"])
    return obj["images"][:n], obj["labels"][:n], meta

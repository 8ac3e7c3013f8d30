"""The sharded prepared format: a split of images decoded and resized once, at `prepare`, then streamed.

data/prepared/<dataset>/
  train-00000.bin ...  the encoded images back to back (JPEG, or raw uint8 H x W x 3), each the whole image resized
  train.index.pt       per image, in storage order: shard number, byte offset, byte length, label, height, width
  test-00000.bin ...   the same for the test split (and test.index.pt)
  meta.json            sizes, classes, the resize policy, sha256 and byte size of every shard and index (written last)
  .prepare/            while a prepare is unfinished: one record per shard written (see write_split); removed at the end

Resize policy (`store_size` S, `size` s of the model's input): each image is loaded as torchvision's ImageFolder
loader does (PIL's convert to RGB: grayscale replicated, CMYK converted, alpha dropped), then resized as
torchvision's Resize(S) resizes a PIL image: shorter side to S, long side int(S * long / short) (truncated), PIL
bilinear (which antialiases when reducing). The whole image is stored. With `encoding: raw` these are torchvision's
pixels exactly. With `encoding: jpeg` the result is re-encoded as JPEG (quality `quality`), and a JPEG source whose
shorter side is at least 4S is decoded at a reduced DCT scale (1/2, 1/4, 1/8) that still leaves >= 2S pixels, then
resized from there over the same source area (README: the differences measured).
Evaluation takes torchvision's CenterCrop(s) of the stored image (offsets int(round((H - s) / 2.0))), so it is
Resize(S) + CenterCrop(s); training's random-resized crop samples its box over the whole stored image
(stream.resized_crop_boxes).

Order: both splits are stored in one fixed pseudo-random order (seeded), so "the first N test images" and "the last N
training images" (validation) are samples of every class, not of the first classes as in a folder listing.
The same files give byte-identical shards, given the same Pillow/libjpeg build."""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import atomic_path, save_torch, sha256_file, write_json
from .lazy import torch

ORDER_SEED = 0x5EED  # the fixed storage order of every split
RESIZE_POLICY = ("RGB; shorter side resized to store_size as torchvision's Resize on PIL images (bilinear, "
                 "antialiased, long side truncated), whole image kept; jpeg: DCT draft decoding at >= 2x; "
                 "evaluation: torchvision's CenterCrop(size)")
RECORDS = ".prepare"  # an unfinished prepare's records of the shards it has written
UNREADABLE_LISTED = 20  # unreadable images named in prepare's message; the rest are counted


def stored_size(w: int, h: int, store_size: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(store_size) of a w x h image: shorter side store_size, the long
    side truncated (torchvision's _compute_resized_output_size)."""
    if w <= h:
        return store_size, int(store_size * h / w)
    return int(store_size * w / h), store_size


class Unreadable(UserError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: not a readable image ({reason}); replace or delete it, then prepare again")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Encoding:
    store_size: int  # S: the stored images' shorter side
    kind: str  # "jpeg" | "raw"
    quality: int  # JPEG quality

    def encode(self, path: str) -> tuple[bytes, int, int]:
        """One image file -> (the stored bytes, height, width) (see the module's resize policy)."""
        from PIL import Image

        s = self.store_size
        try:
            with Image.open(path) as img:
                w, h = img.size
                size = stored_size(w, h, s)
                box = None
                if self.kind == "jpeg" and img.format == "JPEG":  # DCT scaling: 1/2, 1/4 or 1/8 that leaves >= 2S
                    k = next((k for k in (8, 4, 2) if min(w, h) >= 2 * s * k), 1)
                    drafted = img.draft("RGB", (w // k, h // k)) if k > 1 else None  # PIL then picks scale k
                    box = drafted[1] if drafted else None  # the source area in the reduced image's pixels
                img = img.convert("RGB")
                if box is not None or img.size != size:  # torchvision's Resize returns an image of its size as is
                    img = img.resize(size, Image.BILINEAR, box=box)
                if self.kind == "raw":
                    return np.asarray(img, dtype=np.uint8).tobytes(), size[1], size[0]  # H x W x 3, as decode_jpeg
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=self.quality)
                return buf.getvalue(), size[1], size[0]
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise Unreadable(path, (str(e).splitlines() or [type(e).__name__])[0][:160]) from None

    def decode(self, data: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Stored bytes (uint8 1-D) -> uint8 (3, height, width) (HWC in memory), on the CPU."""
        if self.kind == "raw":
            return data.view(height, width, 3).permute(2, 0, 1)
        from torchvision.io import decode_jpeg

        x = decode_jpeg(data)
        if x.shape != (3, height, width):
            raise RuntimeError(f"decoded to {tuple(x.shape)}, the index says (3, {height}, {width})")
        return x

    def settings(self) -> list:
        return [self.store_size, self.kind, self.quality if self.kind == "jpeg" else None]


def _encode(args: tuple[Encoding, str]) -> tuple[bytes, int, int] | tuple[None, str, str]:
    try:
        return args[0].encode(args[1])
    except Unreadable as e:  # collected: prepare names every unreadable image at once
        return None, e.path, e.reason


def storage_order(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED))


def shard_inputs(chunk: list[tuple[str, int]], enc: Encoding) -> str:
    """What a shard's bytes are a function of: its files (path, label, size, modification time, in storage order),
    the encoding, the resize policy and Pillow's version."""
    from PIL import __version__ as pillow

    h = hashlib.sha256(json.dumps([RESIZE_POLICY, enc.settings(), pillow]).encode())
    for path, label in chunk:
        try:
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:  # gone or a broken link: the encoder names it as unreadable
            stamp = None
        h.update(json.dumps([path, label, stamp]).encode())
    return h.hexdigest()


def _reusable(out_dir: Path, name: str, chunk: list[tuple[str, int]], enc: Encoding) -> dict | None:
    """The record of shard `name` when the shard on disk is what these inputs give: its record names the same
    inputs, and the file's size and sha256 are the recorded ones."""
    record, shard = out_dir / RECORDS / f"{Path(name).stem}.json", out_dir / name
    try:
        rec = json.loads(record.read_text())
        if (rec["inputs"] != shard_inputs(chunk, enc) or shard.stat().st_size != rec["bytes"]
                or sha256_file(shard) != rec["sha256"]):
            return None
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5] -> "1-3, 6" (shard numbers as the log counts them, from 1)."""
    out, start = [], None
    for i, k in enumerate(ks):
        start = k if start is None else start
        if i + 1 == len(ks) or ks[i + 1] != k + 1:
            out.append(f"{start + 1}-{k + 1}" if k > start else f"{k + 1}")
            start = None
    return ", ".join(out)


INDEX_FIELDS = ("offset", "length", "label", "height", "width")  # per image, besides its shard number
INDEX_DTYPES = {"shard": "int32", "offset": "int64", "length": "int32", "label": "int64", "height": "int32",
                "width": "int32"}


def write_split(out_dir: Path, split: str, files: list[tuple[str, int]], enc: Encoding, shard_images: int,
                workers: int, unreadable: list[tuple[str, str]], log=print) -> dict | None:
    """Encode `files` ((path, label), in any fixed order) into shards; returns meta.json's entries for them.

    Resumable: after each shard, a record of its inputs (shard_inputs), sha256, size and index rows is written
    atomically to .prepare/; a shard whose record matches and whose file still has that sha256 is reused as it is.
    Unreadable images are appended to `unreadable` as (path, reason) and the rest are still encoded (so every bad
    file is named at once); a shard holding one is not written, and neither is the index (returns None then)."""
    order = storage_order(len(files)).tolist()
    files = [files[i] for i in order]
    chunks = [files[start:start + shard_images] for start in range(0, len(files), shard_images)]
    names = [f"{split}-{k:05d}.bin" for k in range(len(chunks))]
    with ThreadPoolExecutor(max(1, min(workers, len(chunks)))) as threads:  # hashlib releases the GIL
        records = list(threads.map(lambda k: _reusable(out_dir, names[k], chunks[k], enc), range(len(chunks))))
    reused = [k for k, rec in enumerate(records) if rec]
    todo = [k for k, rec in enumerate(records) if not rec]
    if reused:
        log(f"[prepare] {split}: shard{'s' if len(reused) > 1 else ''} {_ranges(reused)} reused (of {len(chunks)}; "
            "their inputs and sha256 are unchanged)")
    if todo:
        ctx = get_context("fork") if hasattr(os, "fork") else get_context()
        with ctx.Pool(workers) as pool:
            results = pool.imap(_encode, [(enc, path) for k in todo for path, _ in chunks[k]], chunksize=16)
            for k in todo:
                records[k] = _write_shard(out_dir, names[k], chunks[k], enc, results, unreadable)
                if records[k]:
                    log(f"[prepare] {split}: shard {k + 1}/{len(chunks)} ({k * shard_images + len(chunks[k])} "
                        "images)")
    if not all(records):
        return None
    index = {field: [v for rec in records for v in rec["rows"][field]] for field in INDEX_FIELDS}
    index["shard"] = [k for k, rec in enumerate(records) for _ in range(rec["images"])]
    save_torch(out_dir / f"{split}.index.pt", {field: torch.tensor(index[field], dtype=getattr(torch, dtype))
                                               for field, dtype in INDEX_DTYPES.items()})
    return {"images": len(files), "index": {"name": f"{split}.index.pt",
                                            "sha256": sha256_file(out_dir / f"{split}.index.pt")},
            "shards": {names[k]: {key: rec[key] for key in ("sha256", "bytes", "images")}
                       for k, rec in enumerate(records)}}


class _Unwritten(Exception):
    """A shard holding an unreadable image: its temporary file is dropped."""


def _write_shard(out_dir: Path, name: str, chunk: list[tuple[str, int]], enc: Encoding, results,
                 unreadable: list) -> dict | None:
    """Write one shard from the next len(chunk) results, then its record; None when an image was unreadable."""
    inputs = shard_inputs(chunk, enc)
    rows = {field: [] for field in INDEX_FIELDS}
    offset, bad = 0, 0
    try:
        with atomic_path(out_dir / name) as tmp, open(tmp, "wb") as f:
            for (_, label), (data, *rest) in zip(chunk, (next(results) for _ in chunk)):
                if data is None:
                    unreadable.append(tuple(rest))
                    bad += 1
                    continue
                f.write(data)
                for field, v in zip(INDEX_FIELDS, (offset, len(data), label, *rest)):
                    rows[field].append(v)
                offset += len(data)
            if bad:
                raise _Unwritten
    except _Unwritten:
        return None
    record = {"inputs": inputs, "sha256": sha256_file(out_dir / name), "bytes": offset, "images": len(chunk),
              "rows": rows}
    write_json(out_dir / RECORDS / f"{Path(name).stem}.json", record)
    return record


def _tensor(buf: bytearray) -> torch.Tensor:
    """A uint8 tensor on `buf`'s memory (no copy)."""
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


def _hash(path: Path) -> str:
    return sha256_file(path)


OPEN_SHARDS = 16  # shard files a reader keeps open per process, the most recently read


class ShardReader:
    """Random access to a prepared split's images, by positioned reads (os.pread) of its shard files.

    Open descriptors are bounded: at most OPEN_SHARDS shard files stay open, the least recently read closed first.
    A split has a file per `shard_images` images (ImageNet: 1,282 at 1,000 per shard) and a random order reads
    them all in every DataLoader worker, so one open file (or memory map) per shard touched would pass a process's
    usual limit of 1,024 descriptors. A forked process (a DataLoader worker) inherits the reader with its index
    (loaded and checked once, in the process that opened it) and closes its copies of the parent's descriptors at
    its first read; pickled (spawned workers), it travels without them."""

    def __init__(self, folder: Path, split: str, meta: dict):
        self.folder, self.split, self.meta = Path(folder), split, meta
        self.entry = meta["splits"][split]
        self.fix = (f"run `advtrain prepare {self.folder.name}` again (or `snakemake --cores 1 --force "
                    f"{self.folder}/meta.json`)")
        if meta.get("resize") != RESIZE_POLICY:  # e.g. central squares of an earlier version: other geometry
            raise UserError(f"{self.folder / 'meta.json'}: prepared under another resize policy "
                            f"({meta.get('resize')!r}): {self.fix}")
        self.enc = Encoding(meta["store_size"], meta["encoding"], meta.get("quality", 0))
        index = self._index()
        self.shard, self.offset, self.length = index["shard"], index["offset"], index["length"]
        self.labels = index["label"]
        self.hw = torch.stack([index["height"], index["width"]], 1)  # (N, 2): each stored image's height, width
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently read first
        self._pid = os.getpid()  # the process the descriptors belong to

    def _index(self) -> dict:
        e = self.entry["index"]
        path = self.folder / e["name"]
        if not path.exists():
            raise UserError(f"{path}: missing: {self.fix}")
        if sha256_file(path) != e["sha256"]:
            raise UserError(f"{path}: corrupt (its sha256 does not match meta.json): {self.fix}")
        return torch.load(path, map_location="cpu", weights_only=True)

    def __len__(self) -> int:
        return len(self.labels)

    def names(self) -> list[str]:
        return sorted(self.entry["shards"])

    def check_sizes(self) -> None:
        """Every shard present and of its recorded size: catches a truncated copy at once, for free."""
        for name in self.names():
            path, want = self.folder / name, self.entry["shards"][name]["bytes"]
            if not path.exists():
                raise UserError(f"{path}: missing shard: {self.fix}")
            got = path.stat().st_size
            if got != want:
                raise UserError(f"{path}: truncated or altered ({got} bytes, meta.json says {want}): {self.fix}")

    def verify(self, threads: int = 8) -> None:
        """Sizes, then the sha256 of every shard (threads: hashlib releases the GIL)."""
        self.check_sizes()
        names = self.names()
        with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
            digests = list(pool.map(_hash, [self.folder / n for n in names]))
        for name, digest in zip(names, digests):
            if digest != self.entry["shards"][name]["sha256"]:
                raise UserError(f"{self.folder / name}: corrupt (its sha256 does not match meta.json): {self.fix}")

    def _file(self, k: int) -> int:
        """The open descriptor of shard k (opened now, closing the least recently read beyond OPEN_SHARDS)."""
        if self._pid != os.getpid():  # a forked copy: these are the child's copies of the parent's descriptors
            self.close()
            self._pid = os.getpid()
        fd = self._files.pop(k, None)
        if fd is None:
            while len(self._files) >= OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self.folder / f"{self.split}-{k:05d}.bin", os.O_RDONLY)  # not inherited by exec
        self._files[k] = fd
        return fd

    def _read(self, i: int, into: memoryview) -> None:
        """Image i's stored bytes into `into` (its length)."""
        k, start = int(self.shard[i]), int(self.offset[i])
        fd, done = self._file(k), 0
        while done < len(into):
            got = os.preadv(fd, [into[done:]], start + done)
            if got == 0:
                raise UserError(f"{self.folder / f'{self.split}-{k:05d}.bin'}: truncated (image {i} ends past its "
                                f"end): {self.fix}")
            done += got

    def raw(self, i: int) -> torch.Tensor:
        """Image i's stored bytes (uint8 1-D, its own memory)."""
        buf = bytearray(int(self.length[i]))
        self._read(int(i), memoryview(buf))
        return _tensor(buf)

    def raw_many(self, rows) -> tuple[torch.Tensor, list[int]]:
        """The stored bytes of `rows` back to back in one uint8 buffer, and the len(rows) + 1 offsets of each image's
        bytes in it: what crosses from a DataLoader worker as one piece of shared memory."""
        offsets = [0]
        for n in self.length[[int(i) for i in rows]].tolist():
            offsets.append(offsets[-1] + n)
        buf = bytearray(offsets[-1])
        view = memoryview(buf)
        for j, i in enumerate(rows):
            self._read(int(i), view[offsets[j]:offsets[j + 1]])
        return _tensor(buf), offsets

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # at interpreter exit, or a reader that failed to open
            pass

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def decode(self, rows) -> list[torch.Tensor]:
        """The images `rows` as uint8 (3, height, width) tensors on the CPU, channels-last in memory (each its own
        stored size). Their bytes are read into one buffer and decoded from views of it: per image, no buffer of its
        own and no tensor indexing (a batch of 64 decodes in about 10 % less time than image by image)."""
        rows = [int(i) for i in rows]
        data, offsets = self.raw_many(rows)
        hw = self.hw[rows].tolist()
        out = []
        for j, i in enumerate(rows):
            try:
                out.append(self.enc.decode(data[offsets[j]:offsets[j + 1]], *hw[j]))
            except RuntimeError as e:  # torchvision's decoder on damaged bytes
                k = int(self.shard[i])
                raise UserError(f"{self.folder / f'{self.split}-{k:05d}.bin'}: image {i} does not decode "
                                f"({str(e).splitlines()[0][:120]}): the shard is corrupt: {self.fix}") from None
        return out


def split_digest(entry: dict) -> str:
    """One sha256 for a sharded split: over its index's and shards' sha256, in name order."""
    h = hashlib.sha256(entry["index"]["sha256"].encode())
    for name in sorted(entry["shards"]):
        h.update(entry["shards"][name]["sha256"].encode())
    return h.hexdigest()

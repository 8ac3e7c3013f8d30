"""The sharded prepared format: a split of images decoded and resized once, at `prepare`, then streamed.

data/prepared/<dataset>/
  train-00000.bin ...  the encoded images back to back (JPEG, or raw uint8 S x S x 3), each a square of S pixels
  train.index.pt       per image, in storage order: shard number, byte offset, byte length, label
  test-00000.bin ...   the same for the test split (and test.index.pt)
  meta.json            sizes, classes, the resize policy, sha256 and byte size of every shard and index (written last)

Resize policy (`store_size` S, `size` s of the model's input): each image is converted to RGB as torchvision's
ImageFolder loader does (PIL's convert: grayscale replicated, CMYK converted, alpha dropped), its shorter side
resized to S (PIL bicubic, antialiased; large JPEGs are first decoded at a reduced DCT scale that stays >= 2S, which
is much faster and visually the same), and the central S x S square kept. Evaluation takes the central s x s crop:
torchvision's Resize(S) + CenterCrop(s) exactly. Training crops come from the S x S square, so a random-resized crop
never sees the strips of a long side beyond it (at 4:3, 1/8 of the width on each side).

Order: both splits are stored in one fixed pseudo-random order (seeded), so "the first N test images" and "the last N
training images" (validation) are samples of every class, not of the first classes as in a folder listing.
The same files give byte-identical shards, given the same Pillow/libjpeg build."""
from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import atomic_path, save_torch, sha256_file
from .lazy import torch

ORDER_SEED = 0x5EED  # the fixed storage order of every split
RESIZE_POLICY = ("RGB; shorter side resized to store_size (PIL bicubic, antialiased; JPEG draft decoding at >= 2x), "
                 "central store_size square kept; evaluation: central size crop")


@dataclass(frozen=True)
class Encoding:
    store_size: int  # S: the stored square's side
    kind: str  # "jpeg" | "raw"
    quality: int  # JPEG quality

    def encode(self, path: str) -> bytes:
        """One image file -> the stored bytes (see the module's resize policy)."""
        from PIL import Image

        s = self.store_size
        try:
            with Image.open(path) as img:
                if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still leaves >= 2S pixels
                    w, h = img.size
                    scale = max(1, min(w, h) // (2 * s))
                    if scale >= 2:
                        img.draft("RGB", (w // scale, h // scale))
                img = img.convert("RGB")
                w, h = img.size
                k = s / min(w, h)
                nw, nh = max(s, round(w * k)), max(s, round(h * k))
                img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
                left, top = (nw - s) // 2, (nh - s) // 2
                img = img.crop((left, top, left + s, top + s))
                if self.kind == "raw":
                    return np.asarray(img, dtype=np.uint8).tobytes()  # H x W x 3, as PIL and decode_jpeg lay it out
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=self.quality)
                return buf.getvalue()
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"{path}: not a readable image ({e}); delete or replace it, then prepare again") from None

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        """Stored bytes (uint8 1-D) -> uint8 (3, S, S) (HWC in memory), on the CPU."""
        if self.kind == "raw":
            return data.view(self.store_size, self.store_size, 3).permute(2, 0, 1)
        from torchvision.io import decode_jpeg

        return decode_jpeg(data)


def _encode(args: tuple[Encoding, str]) -> bytes:
    return args[0].encode(args[1])


def storage_order(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED))


def write_split(out_dir: Path, split: str, files: list[tuple[str, int]], enc: Encoding, shard_images: int,
                workers: int, log=print) -> dict:
    """Encode `files` ((path, label), in any fixed order) into shards; returns meta.json's entries for them."""
    order = storage_order(len(files)).tolist()
    files = [files[i] for i in order]
    shards, index = {}, {"shard": [], "offset": [], "length": [], "label": []}
    ctx = get_context("fork") if hasattr(os, "fork") else get_context()
    with ctx.Pool(workers) as pool:
        for k, start in enumerate(range(0, len(files), shard_images)):
            chunk = files[start:start + shard_images]
            name = f"{split}-{k:05d}.bin"
            offset = 0
            with atomic_path(out_dir / name) as tmp, open(tmp, "wb") as f:
                for (path, label), data in zip(chunk, pool.imap(_encode, [(enc, p) for p, _ in chunk], chunksize=16)):
                    f.write(data)
                    index["shard"].append(k)
                    index["offset"].append(offset)
                    index["length"].append(len(data))
                    index["label"].append(label)
                    offset += len(data)
            shards[name] = {"sha256": sha256_file(out_dir / name), "bytes": offset, "images": len(chunk)}
            log(f"[prepare] {split}: shard {k + 1}/{-(-len(files) // shard_images)} ({start + len(chunk)} images)")
    save_torch(out_dir / f"{split}.index.pt", {
        "shard": torch.tensor(index["shard"], dtype=torch.int32),
        "offset": torch.tensor(index["offset"], dtype=torch.int64),
        "length": torch.tensor(index["length"], dtype=torch.int32),
        "label": torch.tensor(index["label"], dtype=torch.int64),
    })
    return {"images": len(files), "index": {"name": f"{split}.index.pt",
                                            "sha256": sha256_file(out_dir / f"{split}.index.pt")},
            "shards": shards}


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
        self.enc = Encoding(meta["store_size"], meta["encoding"], meta.get("quality", 0))
        index = self._index()
        self.shard, self.offset, self.length = index["shard"], index["offset"], index["length"]
        self.labels = index["label"]
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
        for i in rows:
            offsets.append(offsets[-1] + int(self.length[int(i)]))
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

    def decode(self, rows) -> torch.Tensor:
        """uint8 (len(rows), 3, S, S) on the CPU, channels-last in memory."""
        s = self.enc.store_size
        out = torch.empty((len(rows), s, s, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # HWC, as decode_jpeg gives
        for j, i in enumerate(rows):
            try:
                out[j] = self.enc.decode(self.raw(int(i)))
            except RuntimeError as e:  # torchvision's decoder on damaged bytes
                k = int(self.shard[int(i)])
                raise UserError(f"{self.folder / f'{self.split}-{k:05d}.bin'}: image {int(i)} does not decode "
                                f"({str(e).splitlines()[0][:120]}): the shard is corrupt: {self.fix}") from None
        return out


def split_digest(entry: dict) -> str:
    """One sha256 for a sharded split: over its index's and shards' sha256, in name order."""
    h = hashlib.sha256(entry["index"]["sha256"].encode())
    for name in sorted(entry["shards"]):
        h.update(entry["shards"][name]["sha256"].encode())
    return h.hexdigest()

"""Datasets: prepare (source -> verified uint8 tensors + meta.json) and the on-device loader.

Prepared layout, data/prepared/<dataset>/:
  train.pt, test.pt   {"images": uint8 (N, C, H, W), "labels": int64 (N,)}
  meta.json           shapes, classes, source and its checksums, sha256 of train.pt and test.pt (written last)
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DATASETS
from .errors import UserError
from .io import save_torch, write_json

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
# sha256 of the DECOMPRESSED idx files: the same whether they come from Debian's copy (recompressed) or the original
# archive that torchvision downloads (whose .gz md5 torchvision checks itself).
FASHION_FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- Fashion-MNIST -------------------------------------------------------------------------------------------------

def _fashion_source_dir(raw_dir: Path) -> tuple[Path, str]:
    """The system copy when present (offline machines), else torchvision's download into raw_dir."""
    system = Path(os.environ.get("ADVTRAIN_FASHIONMNIST_DIR", FASHION_SYSTEM_DIR))
    if all((system / f"{name}.gz").exists() or (system / name).exists() for name in FASHION_FILES):
        return system, f"system copy {system}"
    from torchvision.datasets import FashionMNIST

    print(f"[prepare] {system} not found; downloading Fashion-MNIST with torchvision into {raw_dir}", flush=True)
    try:
        FashionMNIST(str(raw_dir), download=True)  # verifies torchvision's md5 of every archive
    except Exception as e:  # network errors come in many types
        raise UserError(f"Fashion-MNIST download failed ({e}); on Debian install the offline copy: "
                        "apt-get install dataset-fashion-mnist") from None
    return raw_dir / "FashionMNIST" / "raw", "torchvision download"


def _read_idx(path: Path, expected_sha256: str) -> torch.Tensor:
    gz = path.with_name(path.name + ".gz")
    src = path if path.exists() else gz
    try:
        data = gzip.open(src, "rb").read() if src.suffix == ".gz" else src.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{src}: unreadable ({e}); the copy is corrupt: reinstall it "
                        "(apt-get install --reinstall dataset-fashion-mnist) or delete it to download again") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise UserError(f"{src}: checksum mismatch (sha256 {digest[:12]}..., expected {expected_sha256[:12]}...): "
                        "the copy is corrupt or truncated; reinstall it (apt-get install --reinstall dataset-fashion-mnist) "
                        "or delete it to download again")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def _prepare_fashionmnist(raw_dir: Path) -> tuple[dict, dict, dict]:
    src, how = _fashion_source_dir(raw_dir)
    arrays = {name: _read_idx(src / name, sha) for name, sha in FASHION_FILES.items()}
    train = {"images": arrays["train-images-idx3-ubyte"].unsqueeze(1).contiguous(),
             "labels": arrays["train-labels-idx1-ubyte"].long()}
    test = {"images": arrays["t10k-images-idx3-ubyte"].unsqueeze(1).contiguous(),
            "labels": arrays["t10k-labels-idx1-ubyte"].long()}
    source = {"how": how, "dir": str(src), "sha256_decompressed": FASHION_FILES}
    return train, test, {"classes": FASHION_CLASSES, "source": source}


# --- CIFAR-10 / CIFAR-100 ------------------------------------------------------------------------------------------

def _prepare_cifar(dataset: str, raw_dir: Path, dataset_cls=None) -> tuple[dict, dict, dict]:
    """torchvision's standard download: archive md5 and every batch file's md5 are checked by torchvision itself.
    `dataset_cls` lets a caller substitute a subclass with another url/checksums (the tests serve a small archive)."""
    import torchvision.datasets as tvd

    cls = dataset_cls or {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[dataset]
    splits = {}
    for train in (True, False):
        try:
            ds = cls(str(raw_dir), train=train, download=True)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" / "File not found or corrupted"
            raise UserError(f"{dataset}: {e} (archive in {raw_dir}); delete {raw_dir / cls.base_folder} and the "
                            "archive beside it to download again") from None
        except OSError as e:  # network errors (URLError is an OSError)
            raise UserError(f"{dataset}: download from {cls.url} failed ({e}); put the archive "
                            f"{cls.filename} into {raw_dir} by hand and run prepare again") from None
        except (KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(f"{dataset}: the files in {raw_dir / cls.base_folder} are not CIFAR batches ({e!r}); "
                            "delete that folder and the archive beside it to download again") from None
        splits[train] = {"images": torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                         "labels": torch.tensor(ds.targets, dtype=torch.long)}
        classes = list(ds.classes)
    source = {"how": "torchvision download", "url": cls.url, "archive_md5": cls.tgz_md5,
              "files_md5": {name: md5 for name, md5 in cls.train_list + cls.test_list}}
    return splits[True], splits[False], {"classes": classes, "source": source}


# --- prepare / load ------------------------------------------------------------------------------------------------

def prepare(dataset: str, out_dir: str | os.PathLike, raw_dir: str | os.PathLike = "data/raw", dataset_cls=None) -> dict:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    out_dir, raw_dir = Path(out_dir), Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if dataset == "fashionmnist":
        train, test, extra = _prepare_fashionmnist(raw_dir)
    else:
        train, test, extra = _prepare_cifar(dataset, raw_dir, dataset_cls)
    shape = tuple(DATASETS[dataset]["shape"])
    for split, d in (("train", train), ("test", test)):
        if tuple(d["images"].shape[1:]) != shape or d["images"].dtype != torch.uint8 or len(d["labels"]) != len(d["images"]):
            raise UserError(f"{dataset} {split}: got images {tuple(d['images'].shape)} {d['images'].dtype}, expected "
                            f"(N, {', '.join(map(str, shape))}) uint8 with one label each: the source is corrupt")
    # meta.json is written last: a prepare killed half-way leaves no meta.json, and load() refuses the folder.
    (out_dir / "meta.json").unlink(missing_ok=True)
    save_torch(out_dir / "train.pt", train)
    save_torch(out_dir / "test.pt", test)
    meta = {
        "dataset": dataset,
        "shape": list(shape),
        "num_classes": DATASETS[dataset]["classes"],
        "classes": extra["classes"],
        "n_train": len(train["labels"]),
        "n_test": len(test["labels"]),
        "sha256": {"train.pt": sha256_file(out_dir / "train.pt"), "test.pt": sha256_file(out_dir / "test.pt")},
        "source": extra["source"],
        "seconds": round(time.time() - t0, 2),
    }
    write_json(out_dir / "meta.json", meta)
    return meta


def load_split(prepared_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, int64 labels, meta) of a prepared split, after checking its sha256 against meta.json."""
    d = Path(prepared_dir)
    fix = f"run `advtrain prepare {d.name}` (or `snakemake --cores 1 -R prepare {d}/meta.json`)"
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


# --- the loader ----------------------------------------------------------------------------------------------------

def random_crop(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Zero-pad by `pad` and cut each image at its own offset (dy, dx in [0, 2*pad]): one gather, no per-image loop."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: (B, H, W, C) -> (B, C, H, W)


class DeviceLoader:
    """Keeps the whole uint8 dataset on the training device; each epoch draws one permutation and all crop/flip
    choices at once from its own generator (so a resumed run replays the same stream), and yields float [0, 1] batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str,
                 shuffle: bool = True, crop: int = 0, flip: bool = False, seed: int = 0,
                 channels_last: bool = False):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle, self.crop, self.flip = shuffle, crop, flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n, g = len(self.labels), self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        dy = torch.randint(0, 2 * self.crop + 1, (n,), generator=g) if self.crop else None
        dx = torch.randint(0, 2 * self.crop + 1, (n,), generator=g) if self.crop else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        order, dy, dx, flips = (t.to(self.device, non_blocking=True) if t is not None else None
                                for t in (order, dy, dx, flips))
        for start in range(0, n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            idx = order[sl]
            x = self.images[idx]
            if self.crop:
                x = random_crop(x, self.crop, dy[sl], dx[sl])
            x = x.float().div_(255)
            if self.flip:
                x = torch.where(flips[sl].view(-1, 1, 1, 1), x.flip(3), x)
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]

"""Fashion-MNIST (Xiao et al. 2017): 28x28 grayscale, 10 classes; the embedded default.

Read offline from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, or $ADVTRAIN_FASHIONMNIST_DIR)
when present, else downloaded by torchvision into the raw folder. The sha256 of every DECOMPRESSED idx file is
checked: it is the same whether the files come from Debian's copy (recompressed, so torchvision's .gz md5s do not
match it) or from the original archives."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

from ..errors import UserError
from ..lazy import torch
from .base import Fetched, Source, Split, network_timeout

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
REINSTALL = ("reinstall it (apt-get install --reinstall dataset-fashion-mnist) or delete it to download again")


def system_dir() -> Path:
    return Path(os.environ.get("ADVTRAIN_FASHIONMNIST_DIR", SYSTEM_DIR))


def read_idx(path: Path, expected_sha256: str) -> torch.Tensor:
    """An idx file (plain or .gz) as a uint8 tensor of its stated dimensions, after its checksum."""
    gz = path.with_name(path.name + ".gz")
    src = path if path.exists() else gz
    try:
        data = gzip.open(src, "rb").read() if src.suffix == ".gz" else src.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{src}: unreadable ({e}); the copy is corrupt: {REINSTALL}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise UserError(f"{src}: checksum mismatch (sha256 {digest[:12]}..., expected {expected_sha256[:12]}...): "
                        f"the copy is corrupt or truncated; {REINSTALL}")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


class FashionMNIST(Source):
    name = "fashionmnist"
    shape = (1, 28, 28)
    num_classes = 10
    sizes = {"train": 60000, "test": 10000}
    mean = (0.2860,)
    std = (0.3530,)

    def _files_dir(self, raw_dir: Path) -> tuple[Path, str]:
        """The system copy when present (offline machines), else torchvision's download into raw_dir."""
        system = system_dir()
        if all((system / f"{name}.gz").exists() or (system / name).exists() for name in FILES):
            return system, f"system copy {system}"
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        print(f"[prepare] {system} not found; downloading Fashion-MNIST with torchvision into {raw_dir}", flush=True)
        try:
            with network_timeout():
                TorchvisionFashionMNIST(str(raw_dir), download=True)  # verifies torchvision's md5 of every archive
        except Exception as e:  # network errors come in many types
            raise UserError(f"Fashion-MNIST download failed ({e}); on Debian install the offline copy: "
                            "apt-get install dataset-fashion-mnist") from None
        return raw_dir / "FashionMNIST" / "raw", "torchvision download"

    def fetch(self, raw_dir: Path) -> Fetched:
        src, how = self._files_dir(raw_dir)
        arrays = {name: read_idx(src / name, sha) for name, sha in FILES.items()}
        train = Split(arrays["train-images-idx3-ubyte"].unsqueeze(1).contiguous(),
                      arrays["train-labels-idx1-ubyte"].long())
        test = Split(arrays["t10k-images-idx3-ubyte"].unsqueeze(1).contiguous(), arrays["t10k-labels-idx1-ubyte"].long())
        return Fetched(train, test, CLASSES, {"how": how, "dir": str(src), "sha256_decompressed": FILES})

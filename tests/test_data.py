"""Data preparation and the on-device loader. The CIFAR path is exercised without the internet: a small archive in
CIFAR-10's own on-disk format is served from 127.0.0.1 and fetched by torchvision's real download code."""
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from advtrain.errors import UserError
from advtrain.loader import DeviceLoader, random_crop
from advtrain.prepared import load_split, prepare
from advtrain.sources import CIFAR10 as CIFAR10Source


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _cifar_archive(n_per_batch=20, seed=0) -> tuple[bytes, dict]:
    """cifar-10-python.tar.gz with CIFAR's layout: pickled dicts of uint8 rows (3072 = 3x32x32) and labels."""
    rng = np.random.default_rng(seed)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        files[name] = pickle.dumps({"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                                    "labels": rng.integers(0, 10, n_per_batch).tolist(), "batch_label": name})
    files["batches.meta"] = pickle.dumps({"label_names": [f"class{i}" for i in range(10)]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {k: _md5(v) for k, v in files.items()}


@pytest.fixture
def served_archive(tmp_path):
    archive, md5s = _cifar_archive()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cifar-10-python.tar.gz").write_bytes(archive)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path / "www"), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class LocalCIFAR10(tvd.CIFAR10):  # torchvision's own class; only where it downloads from and the checksums differ
        url = f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz"
        tgz_md5 = _md5(archive)
        train_list = [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)]
        test_list = [["test_batch", md5s["test_batch"]]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5s["batches.meta"]}

    class Local(CIFAR10Source):  # the registered source, reading from the local server
        def torchvision_dataset(self):
            return LocalCIFAR10

    yield Local, archive
    server.shutdown()


def test_cifar_download_prepare_and_load(tmp_path, served_archive):
    cls, archive = served_archive
    meta = prepare(cls(), tmp_path / "prepared", tmp_path / "raw")
    assert (meta["n_train"], meta["n_test"], meta["shape"]) == (100, 20, [3, 32, 32])
    assert meta["source"]["archive_md5"] == _md5(archive) and meta["classes"][0] == "class0"
    x, y, _ = load_split(tmp_path / "prepared", "train")
    assert x.dtype == torch.uint8 and x.shape == (100, 3, 32, 32) and y.dtype == torch.int64
    # the pixel layout is CIFAR's: row-major 3x32x32 per image
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        first = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"))
    assert torch.equal(x[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert y[0].item() == first["labels"][0]
    on_disk = json.loads((tmp_path / "prepared/meta.json").read_text())
    assert set(on_disk["sha256"]) == {"train.pt", "test.pt"}


def test_cifar_bad_checksum_is_a_clear_error(tmp_path, served_archive):
    cls, _ = served_archive

    class Tampered(cls):
        def torchvision_dataset(self):
            class Bad(super().torchvision_dataset()):
                tgz_md5 = "0" * 32

            return Bad

    with pytest.raises(UserError, match="corrupted|md5|checksum"):
        prepare(Tampered(), tmp_path / "prepared", tmp_path / "raw")
    assert not (tmp_path / "prepared" / "meta.json").exists()


def test_fashionmnist_from_system_copy(prepared):
    x, y, meta = load_split(prepared / "data/prepared/fashionmnist", "test")
    assert x.shape == (10000, 1, 28, 28) and meta["n_train"] == 60000 and meta["classes"][9] == "Ankle boot"
    assert torch.bincount(y).tolist() == [1000] * 10


def test_random_crop_matches_a_per_image_reference():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    dy, dx = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    out = random_crop(x, 2, dy, dx)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])


def test_loader_covers_every_image_once_and_augments_on_device():
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    labels = torch.arange(10)
    loader = DeviceLoader(imgs, labels, batch_size=4, device="cpu", seed=1)
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == list(range(10)) and len(loader) == 3
    for xb, yb in loader:  # images stay paired with their labels and scaled to [0, 1]
        assert torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())
    # flip: half the images are mirrored, none is changed otherwise
    ramp = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).expand(64, 1, 4, 4).contiguous()
    xb, _ = next(iter(DeviceLoader(ramp, torch.zeros(64, dtype=torch.long), 64, "cpu", flip=True, seed=0)))
    flipped = (xb[:, 0, 0, 0] > 0).sum().item()
    assert 16 < flipped < 48
    assert all(torch.equal(row, ramp[0, 0, 0].float() / 255) or torch.equal(row, ramp[0, 0, 0].flip(0).float() / 255)
               for row in xb[:, 0, 0])
    # the same seed gives the same stream (what makes a resumed run exact)
    a = [y for _, y in DeviceLoader(imgs, labels, 4, "cpu", seed=3)]
    b = [y for _, y in DeviceLoader(imgs, labels, 4, "cpu", seed=3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))

"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 32x32 colour images, 10 or 100 classes.

Fetched by torchvision's standard download into the raw folder: torchvision checks the archive's md5 and every batch
file's md5 itself. Without internet, put the archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz) into the raw
folder by hand."""
from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import UserError
from ..lazy import torch
from .base import Fetched, Source, Split, network_timeout


class CIFAR10(Source):
    name = "cifar10"
    shape = (3, 32, 32)
    num_classes = 10
    sizes = {"train": 50000, "test": 10000}
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2471, 0.2435, 0.2616)

    def torchvision_dataset(self):
        """torchvision's class for this dataset: its url, archive name and checksums drive the download."""
        from torchvision.datasets import CIFAR10 as Torchvision

        return Torchvision

    def fetch(self, raw_dir: Path) -> Fetched:
        from torchvision.datasets.utils import check_integrity

        cls = self.torchvision_dataset()
        archive = raw_dir / cls.filename
        if archive.exists() and not check_integrity(str(archive), cls.tgz_md5):
            raise UserError(f"{archive}: corrupt or truncated (its md5 is not the published {cls.tgz_md5}): delete it "
                            "to download again, or put a good copy there")
        if not archive.exists() and not (raw_dir / cls.base_folder).exists():
            print(f"[prepare] downloading {cls.url} into {raw_dir}", flush=True)
        splits, classes = {}, []
        for train in (True, False):
            try:
                with network_timeout():
                    ds = cls(str(raw_dir), train=train, download=True)
            except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" / "File not found or corrupted"
                raise UserError(f"{self.name}: {e} (archive in {raw_dir}); delete {raw_dir / cls.base_folder} and the "
                                "archive beside it to download again") from None
            except OSError as e:  # network errors (URLError is an OSError)
                raise UserError(f"{self.name}: download from {cls.url} failed ({e}); put the archive "
                                f"{cls.filename} into {raw_dir} by hand and run prepare again") from None
            except (KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
                raise UserError(f"{self.name}: the files in {raw_dir / cls.base_folder} are not CIFAR batches ({e!r}); "
                                "delete that folder and the archive beside it to download again") from None
            splits[train] = Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                                  torch.tensor(ds.targets, dtype=torch.long))
            classes = list(ds.classes)
        provenance = {"how": "torchvision download", "url": cls.url, "archive_md5": cls.tgz_md5,
                      "files_md5": {name: md5 for name, md5 in cls.train_list + cls.test_list}}
        return Fetched(splits[True], splits[False], classes, provenance)


class CIFAR100(CIFAR10):
    name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def torchvision_dataset(self):
        from torchvision.datasets import CIFAR100 as Torchvision

        return Torchvision

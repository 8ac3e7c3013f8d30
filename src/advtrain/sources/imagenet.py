"""ILSVRC-2012 (ImageNet-1k): 1,000 classes, 1.28 M training and 50,000 validation images; the validation set is
the test split, as in every paper of the field.

The archives cannot be downloaded without an image-net.org account: the user places them in the source's folder
(default data/raw/imagenet). torchvision's ImageNet class checks their md5 and extracts them into its layout
(train/WNID/*.JPEG, val/WNID/*.JPEG, meta.bin); from there it is an image folder (imagefolder.py) whose classes are
the WordNet ids, named by the devkit. RobustBench's fixed 5,000-image validation subset: `test_list` pointing at its
imagenet_test_image_ids.txt."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Listed
from .imagefolder import ImageFolder

ARCHIVES = {  # torchvision.datasets.imagenet.ARCHIVE_META's files, with their sizes for the message
    "ILSVRC2012_img_train.tar": "138 GB",
    "ILSVRC2012_img_val.tar": "6.3 GB",
    "ILSVRC2012_devkit_t12.tar.gz": "2.5 MB",
}


class ImageNet(ImageFolder):
    name = "imagenet"
    defaults = {**ImageFolder.defaults, "size": 224, "store_size": 256, "num_classes": 1000}

    def expected_images(self) -> int:
        return 1_281_167 + (5_000 if self.settings["test_list"] else 50_000)  # RobustBench's subset, or all of val

    def root(self, raw_dir: Path) -> Path:
        return Path(self.settings["path"] or Path(raw_dir) / "imagenet")

    def list_files(self, raw_dir: Path) -> Listed:
        root = self.root(raw_dir)
        extracted = all((root / d).is_dir() for d in ("train", "val")) and (root / "meta.bin").exists()
        missing = [f"{name} ({size})" for name, size in ARCHIVES.items() if not (root / name).exists()]
        if not extracted and missing:
            raise UserError(f"imagenet: {', '.join(missing)} not found in {root}: download ILSVRC-2012 from "
                            f"image-net.org and put the archives there (or set datasets.<name>.source.path), then "
                            "run prepare again")
        from torchvision.datasets import ImageNet as Torchvision

        splits = {}
        for split in ("train", "val"):
            try:  # the first time: md5 of each archive, then extraction into the layout (hours for the train tar)
                splits[split] = Torchvision(str(root), split=split)
            except RuntimeError as e:  # torchvision: "The archive ... is not present in the root directory or is
                raise UserError(f"imagenet: {e}") from None  # corrupted" (its md5 did not match)
        to_index = splits["train"].wnid_to_idx  # the val folder's own class list could lack a class: map by WNID
        if self.settings["test_list"]:
            test = self.listed_test(root / "val", to_index)
        else:
            val = splits["val"]
            test = [(path, to_index[val.wnids[k]]) for path, k in val.samples]
        classes = [names[0] for names in splits["train"].classes]
        return Listed(list(splits["train"].samples), test, classes,
                      {"how": "ILSVRC-2012 archives, md5 checked by torchvision", "path": str(root),
                       "archives": sorted(ARCHIVES)})

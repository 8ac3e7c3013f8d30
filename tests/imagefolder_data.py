"""A small ImageFolder written as real files: JPEGs of varied sizes and aspect ratios, a few classes, and the odd
files real folders hold (a grayscale JPEG, a CMYK JPEG, an RGBA PNG). Class k's images are smooth colour noise
around colour k, so a small model learns them in an epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array([[190, 60, 60], [60, 190, 60], [60, 60, 190], [190, 190, 60]])
ODD = {0: "L", 1: "CMYK", 2: "RGBA"}  # training images 0-2: grayscale JPEG, CMYK JPEG, RGBA PNG


def make_image_folder(root: Path, n_train: int = 240, n_test: int = 64, seed: int = 0,
                      size_range: tuple[int, int] = (36, 110)) -> Path:
    rng = np.random.default_rng(seed)
    classes = len(COLOURS)
    for split, n in (("train", n_train), ("val", n_test)):
        for i in range(n):
            k = i % classes
            w, h = (int(v) for v in rng.integers(*size_range, 2))
            coarse = COLOURS[k] + rng.normal(0, 45, (h // 6 + 2, w // 6 + 2, 3))
            img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            mode = ODD.get(i) if split == "train" else None
            if mode == "RGBA":
                img.convert("RGBA").save(folder / f"img{i:04d}.png")
            else:
                img.convert(mode or "RGB").save(folder / f"img{i:04d}.jpg", quality=90)
    return root


PHOTO_SIZES = [(500, 300), (300, 500), (333, 333), (480, 360), (360, 480), (401, 299), (299, 401), (450, 351),
               (317, 463), (499, 374)]  # (width, height): landscape and portrait, both sides of 4:3 and of 3:4
PHOTO_MODES = ["RGB", "L", "CMYK", "RGBA", "P"]  # RGBA and P are written as PNG, the rest as JPEG


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A stand-in for a photograph: smooth colour fields plus fine texture (as benchmarks/loader_bench.py's)."""
    coarse = rng.normal(128, 60, (h // 16 + 2, w // 16 + 2, 3))
    img = np.asarray(Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                     dtype=np.float32)
    img += rng.normal(0, 12, (h, w, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_photo_folder(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """An ImageFolder of ImageNet-size images (sides 299-500, PHOTO_SIZES in turn) in every mode of PHOTO_MODES,
    two classes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_test)):
        for i in range(n):
            w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
            mode = PHOTO_MODES[(i + i // len(PHOTO_SIZES)) % len(PHOTO_MODES)]  # another mode per size in turn
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            img = photo(rng, w, h).convert(mode)
            if mode in ("RGBA", "P"):
                img.save(folder / f"img{i:04d}.png")
            else:
                img.save(folder / f"img{i:04d}.jpg", quality=90)
    return root

"""Loader benchmark: our sharded stream against the references' loader, on the same image files, in one run.

    python benchmarks/loader_bench.py --images 2000 --workers 2
    python benchmarks/loader_bench.py --images 20000 --workers 8 --device cuda   # GPU machine: GPU decode

1. Writes --images JPEG files in torchvision's ImageFolder layout (10 classes) at ImageNet's typical sizes (sides
   drawn from 300-500 x 250-500 pixels, quality 90, textured content: see `photo`), or reads --folder.
2. `prepare`s them with the imagefolder source (size 224, stored at shorter side 256, JPEG quality 90, or --encoding
   raw), timed: that is the one-off cost per image, and the shards' size is the disk cost.
3. Times, for --batches batches of --batch-size after --warmup batches:
   REFERENCE  torchvision.datasets.ImageFolder + transforms (RandomResizedCrop(224), RandomHorizontalFlip,
              ToTensor) + torch.utils.data.DataLoader(shuffle, --workers workers, pinned memory on CUDA), each
              batch moved to --device: the loader of FREE's, fast AT's and DEAT's ImageNet code;
   OURS       advtrain's StreamLoader on the prepared shards: --workers DataLoader workers read and decode
              (torchvision.io.decode_jpeg; on CUDA the GPU decodes), random-resized crop and flip on --device
              (on the CPU: in the workers), batches channels-last as the trainer asks for them.
   Both deliver float [0, 1] batches of (B, 3, 224, 224) on --device; images/s counts delivered images.
Files are read from the page cache in both (the folder was just written or read), so disk speed is not measured."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def photo(rng: np.random.Generator, w: int, h: int):
    """A JPEG-compressible stand-in for a photograph: smooth colour fields plus fine texture (a file of tens of KB at
    quality 90, as ImageNet's are; decode time depends on pixels and file size, not on what the image shows)."""
    from PIL import Image

    coarse = rng.normal(128, 60, (h // 16 + 2, w // 16 + 2, 3))
    img = np.asarray(Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                     dtype=np.float32)
    img += rng.normal(0, 12, (h, w, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_folder(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, int(rng.integers(300, 501)), int(rng.integers(250, 501))).save(folder / f"{i:06d}.JPEG", quality=90)
    (root / "val" / "class0").mkdir(parents=True, exist_ok=True)
    shutil.copy(next((root / "train" / "class0").iterdir()), root / "val" / "class0" / "0.JPEG")


def timed(batches, n_warmup: int, n_batches: int, device: torch.device) -> tuple[float, int]:
    seen, t0 = 0, None
    for i, (x, _) in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == n_warmup:
            t0 = time.perf_counter()
        elif i > n_warmup:
            seen += len(x)
        if i == n_warmup + n_batches:
            break
    return seen / (time.perf_counter() - t0), seen


def reference(root: Path, args, device: torch.device):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    ds = datasets.ImageFolder(str(root / "train"), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def ours(prepared: Path, args, device: torch.device):
    from advtrain.prepared import open_split
    from advtrain.stream import StreamLoader

    decode = "cuda" if device.type == "cuda" else "cpu"
    data, _ = open_split(prepared, "train", {"stream": {"workers": args.workers, "decode": decode}})
    loader = StreamLoader(data.reader, data.rows, args.batch_size, device, 224,
                          {"resized_crop": [0.08, 1.0], "flip": True}, seed=0, channels_last=True,
                          workers=args.workers, decode=decode)
    while True:
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--folder", type=Path, help="an existing ImageFolder (train/ and val/) instead of generated files")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--encoding", choices=("jpeg", "raw"), default="jpeg")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args()
    device = torch.device(args.device)
    from advtrain.cpus import usable_cpus
    from advtrain.prepared import prepare
    from advtrain.sources import SOURCES

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = args.folder
        if root is None:
            root = tmp / "folder"
            t0 = time.perf_counter()
            write_folder(root, args.images)
            print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.0f}s", flush=True)
        files = [p for p in (root / "train").rglob("*") if p.is_file()]
        raw_bytes = sum(p.stat().st_size for p in files)
        src = SOURCES["imagefolder"]({"path": str(root), "size": 224, "store_size": 256, "encoding": args.encoding,
                                      "shard_images": 1000})
        t0 = time.perf_counter()
        meta = prepare(src, tmp / "prepared" / "bench", tmp / "raw")
        prep_s = time.perf_counter() - t0
        shard_bytes = sum(e["bytes"] for e in meta["splits"]["train"]["shards"].values())
        n = meta["n_train"]
        print(f"prepare: {n} images in {prep_s:.1f}s ({n / prep_s:.0f} img/s with {min(usable_cpus(), 16)} "
              f"processes); source {raw_bytes / n / 1e3:.1f} KB/image, shards {shard_bytes / n / 1e3:.1f} KB/image",
              flush=True)
        figures = {}
        for name, make in (("reference", lambda: reference(root, args, device)),
                           ("ours", lambda: ours(tmp / "prepared" / "bench", args, device))):
            rate, seen = timed(make(), args.warmup, args.batches, device)
            figures[name] = rate
            print(f"{name:>9}: {rate:7.0f} images/s ({seen} images, {args.workers} workers, batch {args.batch_size}, "
                  f"{device})", flush=True)
        ratio = figures["ours"] / figures["reference"]
        print(f"ours / reference: {ratio:.2f}x")
        result = {"images": n, "workers": args.workers, "batch_size": args.batch_size, "device": str(device),
                  "encoding": args.encoding, "prepare_seconds": prep_s, "source_kb_per_image": raw_bytes / n / 1e3,
                  "shard_kb_per_image": shard_bytes / n / 1e3, "images_per_s": figures, "ratio": ratio,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "torch": torch.__version__}
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

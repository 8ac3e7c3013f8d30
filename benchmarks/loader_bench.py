"""Loader benchmark: our sharded stream against the references' loader, on the same image files, in one run.

    python benchmarks/loader_bench.py --images 2000 --workers 2
    python benchmarks/loader_bench.py --images 20000 --workers 8 --device cuda   # GPU machine: GPU decode

1. Writes --images JPEG files in torchvision's ImageFolder layout (10 classes) at ImageNet's typical sizes (sides
   drawn from 300-500 x 250-500 pixels, quality 90, textured content: see `photo`), or reads --folder.
2. `prepare`s them with the imagefolder source (size 224, stored at shorter side 256, JPEG quality 90, or --encoding
   raw), timed: that is the one-off cost per image, and the shards' size is the disk cost.
3. Makes each loader once (persistent workers in both) and times them in --rounds alternated rounds (the order
   rotating), each round --batches batches of --batch-size after --warmup untimed ones (an idle loader's workers
   have filled its queue meanwhile):
   reference   torchvision.datasets.ImageFolder + transforms (RandomResizedCrop(224), RandomHorizontalFlip,
               ToTensor) + torch.utils.data.DataLoader(shuffle, --workers workers, pinned memory on CUDA), each
               batch moved to --device: the loader of FREE's, fast AT's and DEAT's ImageNet code. Its workers
               decode with PIL, crop, resize, flip and convert to float; each batch crosses as float32.
   ours        advtrain's StreamLoader.batches on the prepared shards, what the trainer takes: float [0, 1]
               channels-last batches on --device. --workers DataLoader workers read and decode
               (torchvision.io.decode_jpeg; on CUDA the GPU decodes), crop, resize and flip (on CUDA the device
               does) and send uint8; the training process converts to float on the device (on CUDA a batch ahead,
               on a side stream).
   ours_uint8  (CPU only) the same stream as the workers deliver it, before the float conversion
               (StreamLoader.uint8_batches): on a GPU the conversion runs on the device, off the host.
   images/s counts delivered images; the ratios are the median over rounds of ours / reference in the same round.
   The process takes the trainer's malloc settings (trainer.keep_freed_memory), which its workers inherit.
Files are read from the page cache in both (the folder was just written or read), so disk speed is not measured."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from advtrain.io import write_json


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


def take(batches, n: int, device: torch.device) -> tuple[float, int]:
    """Images per second over the next n batches of `batches` (a running iterator)."""
    seen, t0 = 0, time.perf_counter()
    for _ in range(n):
        x, _ = next(batches)
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0), seen


def reference(root: Path, args, device: torch.device):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    ds = datasets.ImageFolder(str(root / "train"), tf)
    # persistent workers, as ours: the references' loaders restart theirs every epoch, which would only slow them
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=args.workers > 0)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def stream_loader(prepared: Path, args, device: torch.device):
    from advtrain.prepared import open_split
    from advtrain.stream import StreamLoader

    decode = "cuda" if device.type == "cuda" else "cpu"
    data, _ = open_split(prepared, "train", {"stream": {"workers": args.workers, "decode": decode}})
    return StreamLoader(data.reader, data.rows, args.batch_size, device, 224,
                        {"resized_crop": [0.08, 1.0], "flip": True}, seed=0, channels_last=True,
                        workers=args.workers, decode=decode)


def ours(prepared: Path, args, device: torch.device):
    """What the trainer takes: float [0, 1] batches on the device (StreamLoader.batches)."""
    loader = stream_loader(prepared, args, device)
    while True:
        yield from loader


def ours_uint8(prepared: Path, args, device: torch.device):
    """What crosses from the workers on the CPU: uint8 crops, before the float conversion on the device."""
    loader = stream_loader(prepared, args, device)
    while True:
        yield from loader.uint8_batches()


def prepared_folder(work: Path, args) -> tuple[Path, Path, dict, float]:
    """The ImageFolder and its prepared shards under `work`, made unless already there (--work keeps them)."""
    from advtrain.cpus import usable_cpus
    from advtrain.prepared import prepare, read_meta
    from advtrain.sources import SOURCES

    root = args.folder or work / "folder"
    if args.folder is None and not (root / "val").exists():
        t0 = time.perf_counter()
        write_folder(root, args.images)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.0f}s", flush=True)
    out = work / "prepared" / f"bench-{args.encoding}"
    prep_s = float("nan")
    if not (out / "meta.json").exists():
        src = SOURCES["imagefolder"]({"path": str(root), "size": 224, "store_size": 256, "encoding": args.encoding,
                                      "shard_images": 1000})
        t0 = time.perf_counter()
        prepare(src, out, work / "raw")
        prep_s = time.perf_counter() - t0
        print(f"prepare: {prep_s:.1f}s with {min(usable_cpus(), 16)} processes", flush=True)
    return root, out, read_meta(out)[0], prep_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--folder", type=Path, help="an existing ImageFolder (train/ and val/) instead of generated files")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per loader and round")
    ap.add_argument("--warmup", type=int, default=10, help="untimed batches before each timing (at least the "
                                                           "batches a loader's workers queue: 4 per worker)")
    ap.add_argument("--rounds", type=int, default=5, help="timings of each loader, alternated")
    ap.add_argument("--work", type=Path, help="keep the generated files and shards here (reused when present)")
    ap.add_argument("--encoding", choices=("jpeg", "raw"), default="jpeg")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args()
    from advtrain.stream import StreamLoader
    from advtrain.trainer import keep_freed_memory

    device = torch.device(args.device)
    if device.type == "cpu":  # the training process's malloc settings (Trainer), which its workers inherit: a float
        keep_freed_memory()  # batch re-allocated without page faults costs a fifth (3.5 ms, not 18 ms at batch 64)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        root, prepared, meta, prep_s = prepared_folder(work, args)
        files = [p for p in (root / "train").rglob("*") if p.is_file()]
        n = meta["n_train"]
        raw_bytes = sum(p.stat().st_size for p in files)
        shard_bytes = sum(e["bytes"] for e in meta["splits"]["train"]["shards"].values())
        print(f"{n} images; source {raw_bytes / n / 1e3:.1f} KB/image, shards {shard_bytes / n / 1e3:.1f} KB/image",
              flush=True)
        makers = {"reference": lambda: reference(root, args, device), "ours": lambda: ours(prepared, args, device)}
        if device.type == "cpu" and hasattr(StreamLoader, "uint8_batches"):  # (an earlier version's, for A/B)
            makers["ours_uint8"] = lambda: ours_uint8(prepared, args, device)
        # every loader is made and warmed up once; then each round times --batches of each, the order rotating
        # from round to round, so that a change of load during the run falls on all of them. Before each timing,
        # --warmup batches are drawn: an idle loader's workers have filled its queue meanwhile
        loaders = {name: make() for name, make in makers.items()}
        for it in loaders.values():
            take(it, args.warmup, device)
        names = list(loaders)
        rates = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                take(loaders[name], args.warmup, device)
                rate, seen = take(loaders[name], args.batches, device)
                rates[name].append(rate)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()) + " images/s  "
                  f"(load average {os.getloadavg()[0]:.2f})", flush=True)
        median = {k: statistics.median(v) for k, v in rates.items()}
        per_round = {k: [a / b for a, b in zip(v, rates["reference"])] for k, v in rates.items() if k != "reference"}
        ratios = {k: statistics.median(v) for k, v in per_round.items()}
        for k in names:
            than = (f"; / reference: median {ratios[k]:.2f}x (rounds {min(per_round[k]):.2f}-{max(per_round[k]):.2f}x)"
                    if k in ratios else "")
            print(f"{k:>10}: median {median[k]:6.0f} images/s over {args.rounds} rounds of {args.batches} batches of "
                  f"{args.batch_size} ({args.workers} workers, {device}){than}", flush=True)
        result = {"images": n, "workers": args.workers, "batch_size": args.batch_size, "device": str(device),
                  "encoding": args.encoding, "rounds": args.rounds, "batches": args.batches,
                  "prepare_seconds": prep_s, "source_kb_per_image": raw_bytes / n / 1e3,
                  "shard_kb_per_image": shard_bytes / n / 1e3, "images_per_s": rates, "median": median,
                  "ratio": ratios, "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                  "load_average": os.getloadavg()}
        if args.out:
            write_json(args.out, result)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()

"""The training loader for sharded data (shards.py): images read and decoded by DataLoader workers, then cropped,
resized and flipped on the training device (on the CPU, in the workers).

Per epoch, the main process draws the order and every image's crop box and flip from the loader's own generator
(so the stream is a function of the seed, and a resumed run replays it) and hands the plan to the workers, which
persist across epochs; workers only read and decode (and, training on the CPU, crop). Each batch crosses from a
worker as one uint8 tensor, made in shared memory. The training process turns it into the float batch the trainer
takes, on the training device; on CUDA one batch ahead, on a side stream while the step before runs (prefetch.py).
Under data parallelism each rank reads and decodes only its part of every global batch. On CUDA the JPEG decode can
run on the GPU (`decode: cuda`): the workers then only read bytes."""
from __future__ import annotations

import math
import signal

from .cpus import usable_cpus
from .distributed import World
from .errors import UserError
from .lazy import F, torch
from .loader import shard_rows
from .prefetch import prefetched
from .shards import ShardReader

RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop aspect-ratio range
LOG_RATIO = (math.log(RATIO[0]), math.log(RATIO[1]))
ATTEMPTS = 10  # torchvision's tries before it falls back to a central crop


def crop_draws(n: int, scale: tuple[float, float], g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The random numbers of n RandomResizedCrop boxes, as torchvision draws them per attempt: the area fraction
    (float32 uniform in `scale`), the log aspect ratio (float32 uniform in LOG_RATIO), and the top and left
    positions (uniform [0, 1), scaled to the free range as torch.randint(0, free) picks)."""
    fraction = torch.empty(n, ATTEMPTS).uniform_(scale[0], scale[1], generator=g)
    log_ratio = torch.empty(n, ATTEMPTS).uniform_(*LOG_RATIO, generator=g)
    position = torch.rand(n, ATTEMPTS, 2, generator=g)
    return fraction, log_ratio, position


def boxes_from_draws(hw: torch.Tensor, fraction: torch.Tensor, log_ratio: torch.Tensor,
                     position: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised over images of sizes hw ((n, 2): height, width) given
    crop_draws' numbers: (n, 4) float boxes (x0, y0, w, h) in pixels. As torchvision: the target area is a fraction
    of the whole image, the sides are rounded (half to even, in float64), the first of ATTEMPTS draws that fits is
    taken, and when none fits, the central crop of the whole image with its aspect ratio clamped to RATIO."""
    n = len(hw)
    height, width = hw[:, :1].double(), hw[:, 1:].double()
    area = height * width * fraction.double()
    ratio = torch.exp(log_ratio).double()  # torchvision: exp of the float32 draw, then a Python float
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(1)
    pick = fits.int().argmax(1)
    rows = torch.arange(n)
    w, h, position = w[rows, pick], h[rows, pick], position[rows, pick].double()
    height, width = height[:, 0], width[:, 0]
    y0 = torch.floor(position[:, 0] * (height - h + 1))  # torchvision draws the top, then the left
    x0 = torch.floor(position[:, 1] * (width - w + 1))
    in_ratio = width / height  # the fallback: the whole image, its aspect ratio clamped to RATIO
    fw = torch.where(in_ratio > RATIO[1], (height * RATIO[1]).round(), width)
    fh = torch.where(in_ratio < RATIO[0], (width / RATIO[0]).round(), height)
    fx0, fy0 = torch.div(width - fw, 2, rounding_mode="floor"), torch.div(height - fh, 2, rounding_mode="floor")
    box = torch.stack([x0, y0, w, h], 1)
    return torch.where(found[:, None], box, torch.stack([fx0, fy0, fw, fh], 1)).float()


def resized_crop_boxes(hw: torch.Tensor, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling over whole images of sizes hw ((n, 2): height, width): (n, 4)
    float boxes (x0, y0, w, h) in pixels."""
    draws = crop_draws(len(hw), scale, g)
    step = 1 << 16  # in parts: float64 temporaries of all of ImageNet's draws would take about a gigabyte
    return torch.cat([boxes_from_draws(hw[i:i + step], *(d[i:i + step] for d in draws))
                      for i in range(0, len(hw), step)]) if len(hw) else torch.empty(0, 4)


def centre_offsets(hw: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop(size) offsets (n, 2) (x0, y0) in images of sizes hw: int(round((side - size) / 2.0)),
    halves to even as Python rounds them."""
    return ((hw.flip(1) - size).double() / 2.0).round().long()


def shifted_boxes(hw: torch.Tensor, size: int, pad: int, g: torch.Generator | None) -> torch.Tensor:
    """The central size x size box of each image (sizes hw: (n, 2) height, width), shifted by up to `pad` pixels
    each way (pad-and-crop: outside is zero)."""
    box = torch.cat([centre_offsets(hw, size), torch.full((len(hw), 2), size)], 1)
    if pad and g is not None:
        box[:, :2] += torch.randint(-pad, pad + 1, (len(hw), 2), generator=g)
    return box


def crop_resize(images, box: torch.Tensor, flip: torch.Tensor | None, size: int, uint8: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Cut each image (uint8 (C, H, W), each its own size; a list, or a batch tensor) to its box (whole pixels;
    outside the image is zero), resize it to size x size (bilinear, antialiased: torchvision's resize of a tensor),
    mirror it where `flip` (a CPU tensor: each image's flip is decided on the host, so no mask is sent to the device
    and nothing waits for it): float [0, 1] (n, C, size, size), channels-last, on the images' device. A box of the
    output's size is copied exactly. On the CPU the resize runs on uint8 pixels (rounded, as PIL's resize of the
    references' loader is), and `uint8` returns those pixels as they are (the workers send them so: the float
    division is the training device's), in `out` if given (uint8, channels-last); on CUDA on floats."""
    images = list(images)
    c, device = images[0].shape[0], images[0].device
    cpu = device.type == "cpu"
    dtype = torch.uint8 if cpu else torch.float32
    if out is None or not (uint8 and cpu):
        out = torch.empty((len(images), c, size, size), dtype=dtype, device=device, memory_format=torch.channels_last)
    flips = [False] * len(images) if flip is None else flip.tolist()
    for i, (img, (x0, y0, w, h), mirror) in enumerate(zip(images, box.long().tolist(), flips)):
        height, width = img.shape[-2:]
        if x0 >= 0 and y0 >= 0 and x0 + w <= width and y0 + h <= height:
            patch = img[:, y0:y0 + h, x0:x0 + w]
        else:  # pad-and-crop: the part of the box inside the image, zeros around it
            patch = img.new_zeros((c, h, w))
            ax, ay, bx, by = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
            if bx > ax and by > ay:
                patch[:, ay - y0:by - y0, ax - x0:bx - x0] = img[:, ay:by, ax:bx]
        if (h, w) != (size, size):
            # channels-last: decode_jpeg gives HWC pixels, and the uint8 resize kernels are fastest on them
            patch = patch[None].to(dtype).contiguous(memory_format=torch.channels_last)
            patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = patch.flip(2) if mirror else patch
    if uint8 and cpu:
        return out
    return out.float().div_(255) if out.dtype == torch.uint8 else out.div_(255)


class _Plan:
    """The DataLoader's sampler: the items of the epoch being read (set by StreamLoader.batches before each epoch).
    The DataLoader sends each item to a worker through its index queue, so the persistent workers get every
    epoch's plan without being made again."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _Batches:
    """Reads a batch of the epoch's plan in a DataLoader worker. Its item (from _Plan) is (k, rows, boxes, flips):
    batch k's stored images and, for the "augmented" stage, their crop boxes and flips, as numpy arrays (pickled by
    value; a tensor would cross as its own piece of shared memory, a descriptor each). By `stage` it returns
    ("bytes": the GPU decodes) the images' stored bytes in one buffer and their offsets, ("decoded": the device
    crops) the uint8 images' HWC pixels (each image its stored size) in one buffer and their offsets, or
    ("augmented": training on the CPU, where the workers crop too, so the work spreads over them) the cropped,
    resized, flipped images as uint8: each batch crosses to the training process as one tensor. It holds the
    reader of the training process: a forked worker shares its index, loaded and checked once. A map-style dataset
    by its __getitem__, as DataLoader takes one; it does not subclass torch's Dataset (which adds only `+`), as a
    base class would load torch when this module is imported."""

    def __init__(self, reader: ShardReader, stage: str, size: int):
        self.reader, self.stage, self.size = reader, stage, size

    def __getitem__(self, item):
        k, rows, box, flip = item
        if self.stage == "bytes":
            data, offsets = self.reader.raw_many(rows)
            return data, offsets, k
        x = self.reader.decode(rows)
        if self.stage == "decoded":  # images of their own sizes: their HWC pixels back to back in one buffer
            offsets = [0]
            for img in x:
                offsets.append(offsets[-1] + img.numel())
            return torch.cat([img.permute(1, 2, 0).reshape(-1) for img in x], out=_shared((offsets[-1],))), offsets, k
        if self.stage == "augmented":
            # uint8: a quarter of float32's bytes to send, and the worker spends no time on a float conversion
            x = crop_resize(x, torch.from_numpy(box), None if flip is None else torch.from_numpy(flip), self.size,
                            uint8=True, out=_shared((len(x), 3, self.size, self.size)))
        return x, None, k


def _shared(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor (channels-last when 4-D) in shared memory from the start, as torch's default
    collate makes its batches in a worker: sent to the training process, it is passed by its descriptor and not first
    copied into shared memory (a 64-image 224 px batch: about 2 ms of the worker's ~45)."""
    n = math.prod(shape)
    x = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n), 0, (n,))
    return x.view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2) if len(shape) == 4 else x


def _ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM, SIGUSR1 and SIGINT. SLURM's time limit signals every process of the job,
    and a worker that died of it would make torch raise "DataLoader worker (pid N) is killed by signal" in the
    training process at any point, before the checkpoint the signal asks for (preemption.py). The training
    process stops its workers itself when it exits."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class StreamLoader:
    """Batches of float [0, 1] images (B, 3, size, size) on `device` with their labels, from a sharded split.

    `rows`: which stored images (storage order) this loader trains on. `shard`: under data parallelism, this
    rank's slice of a global batch; the loader then yields only that part.

    The DataLoader and its workers are made at the first epoch and kept for the next ones (persistent workers);
    each epoch's plan reaches them through the sampler. Images come to the training process as uint8 and become
    float on the training device (on CUDA a batch ahead, on a side stream: prefetch.prefetched). One epoch is read
    at a time: starting another abandons what is left of the last."""

    def __init__(self, reader: ShardReader, rows: torch.Tensor, batch_size: int, device: torch.device | str,
                 size: int, augment: dict, seed: int = 0, channels_last: bool = False, workers: int = 2,
                 decode: str = "cpu", shard=None):
        self.reader, self.rows = reader, rows
        self.labels = reader.labels[rows]
        self.batch_size, self.size, self.augment = batch_size, size, augment
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.workers, self.decode_on = workers, decode
        if decode == "cuda" and self.device.type != "cuda":
            raise UserError(f"decode: cuda, but training runs on {self.device}: set the source's decode to auto or cpu")
        self.shard = shard
        self.generator = torch.Generator().manual_seed(seed)
        cuda = self.device.type == "cuda"
        gpu_decode = cuda and decode in ("auto", "cuda") and reader.enc.kind == "jpeg"
        self.stage = ("bytes" if gpu_decode else "decoded") if cuda else "augmented"
        self._plan = _Plan()
        self._loader = None  # the DataLoader, made at the first epoch
        self._decode_stream = None  # where the GPU decode's outputs are allocated (see _decode_on_gpu)
        self.ahead = None  # prefetched's look-ahead: on CUDA (None); True runs its order on the CPU too (tests)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def plan(self):
        """The epoch's draws, in a fixed order: permutation, boxes, flips."""
        n, g = len(self.rows), self.generator
        order = torch.randperm(n, generator=g)
        hw = self.reader.hw[self.rows[order]]  # box j is for the j-th image of the epoch
        scale = self.augment.get("resized_crop")
        if scale:
            box = resized_crop_boxes(hw, tuple(scale), g)
        else:
            box = shifted_boxes(hw, self.size, self.augment.get("crop", 0), g)
        flips = torch.rand(n, generator=g) < 0.5 if self.augment.get("flip") else None
        return order, box, flips

    def __iter__(self):
        return self.batches()

    def _epoch(self, start: int):
        """The epoch's draws (plan) and each batch's slice of them (this rank's part); the workers' plan is set to
        batches `start` on."""
        order, box, flips = self.plan()
        n = len(order)
        parts = [shard_rows(slice(s, min(s + self.batch_size, n)), self.shard) for s in range(0, n, self.batch_size)]
        augmented = self.stage == "augmented"
        self._plan.items = [(k, self.rows[order[p]].numpy(), box[p].numpy() if augmented else None,
                             flips[p].numpy() if augmented and flips is not None else None)
                            for k, p in enumerate(parts) if k >= start]
        return order, box, flips, parts

    def batches(self, start: int = 0):
        """The epoch's batches from batch `start` on: the epoch's draws are all made (the generator ends where a
        whole epoch leaves it), the first `start` batches are neither read nor yielded (a checkpoint inside an epoch
        resumes so)."""
        order, box, flips, parts = self._epoch(start)
        augmented = self.stage == "augmented"
        cuda = self.device.type == "cuda"

        def finish(batch):
            """A worker's batch -> (float images, labels) on the device: on CUDA queued on prefetched's side
            stream while the training stream runs the step before. Every host->device copy is from pinned memory
            and non-blocking: a blocking one would wait for the stream's queued work."""
            data, offsets, k = batch
            p = parts[k]
            labels = self.labels[order[p]]
            if cuda:
                labels = labels.pin_memory()
            labels = labels.to(self.device, non_blocking=True)
            if self.stage == "bytes":
                x = self._decode_on_gpu(data, offsets)
            elif self.stage == "decoded":
                data = data.to(self.device, non_blocking=True)
                hw = self.reader.hw[self.rows[order[p]]].tolist()
                x = [data[a:b].view(h, w, 3).permute(2, 0, 1) for a, b, (h, w) in zip(offsets, offsets[1:], hw)]
            else:  # the workers' uint8 crops, made float on the training device
                x = data.to(self.device, non_blocking=True).float().div_(255)
            if not augmented:
                x = crop_resize(x, box[p], None if flips is None else flips[p], self.size)
            return x.contiguous(memory_format=self.memory_format), labels

        yield from prefetched(self._dataloader(), finish, self.device, self.ahead)

    def uint8_batches(self, start: int = 0):
        """What crosses from the workers on the CPU path (stage "augmented"): each batch's uint8 crops (B, 3, size,
        size), channels-last, as the workers send them, with their labels: batches(start) before the float conversion
        (the loader benchmark times both)."""
        if self.stage != "augmented":
            raise ValueError("uint8_batches: the workers crop only when training on the CPU")
        order, _, _, parts = self._epoch(start)
        for data, _, k in self._dataloader():
            yield data, self.labels[order[parts[k]]]

    def _dataloader(self):
        if self._loader is None:
            cuda = self.device.type == "cuda"
            self._loader = torch.utils.data.DataLoader(
                _Batches(self.reader, self.stage, self.size), batch_size=None, sampler=self._plan,
                num_workers=self.workers, pin_memory=cuda, prefetch_factor=4 if self.workers else None,
                persistent_workers=self.workers > 0, worker_init_fn=_ignore_stop_signals,
                # the workers' seeds come from its own generator, not from torch's global one, which the attacks
                # draw from: a resumed run finds the global generator where the uninterrupted run had it
                generator=torch.Generator().manual_seed(0))
        return self._loader

    def _decode_on_gpu(self, data: torch.Tensor, offsets: list[int]) -> list[torch.Tensor]:
        """uint8 (3, H, W) images (each its stored size) on the device from the batch's stored JPEG bytes (one
        buffer, image j at offsets[j]:offsets[j + 1]).

        torchvision's CUDA decode_jpeg allocates its outputs on the caller's current stream but writes them from a
        stream of its own, which waits for nothing queued on the caller's. Allocated on the calling stream (the
        prefetch's side stream, where the crops run), an output could be memory the caching allocator has just
        taken back from a tensor that kernels still queued there read, and the decoder would overwrite it under
        them. So it runs with a stream of its own current: its outputs come from that stream's pool, which holds
        nothing but decoder outputs, each reused only after the calling stream's work on it is done
        (record_stream). The calling stream waits for the decode stream, which torchvision has made wait for its
        decoder."""
        from torchvision.io import decode_jpeg

        views = [data[a:b] for a, b in zip(offsets, offsets[1:])]
        current = torch.cuda.current_stream(self.device)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            images = decode_jpeg(views, device=self.device)
        current.wait_stream(self._decode_stream)
        for image in images:
            image.record_stream(current)
        return images

    def global_batch(self, i: int) -> int:
        return min(self.batch_size, len(self.rows) - i * self.batch_size)


def centre(reader: ShardReader, rows: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 torchvision CenterCrop(size) crops of `rows` and their labels, on the CPU (evaluation, validation)."""
    out = torch.empty((len(rows), 3, size, size), dtype=torch.uint8)
    corner = centre_offsets(reader.hw[rows], size).tolist()
    for start in range(0, len(rows), 256):
        for j, img in enumerate(reader.decode(rows[start:start + 256]), start):
            x0, y0 = corner[j]
            out[j] = img[:, y0:y0 + size, x0:x0 + size]
    return out, reader.labels[rows]


class ShardedData:
    """A prepared sharded split as training data: the trainer's view (see loader.InMemory for the other kind)."""

    def __init__(self, reader: ShardReader, size: int, workers: int, decode: str, rows: torch.Tensor | None = None):
        self.reader, self.size, self.workers, self.decode = reader, size, workers, decode
        self.rows = torch.arange(len(reader)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, n: int) -> "ShardedData":
        return ShardedData(self.reader, self.size, self.workers, self.decode, self.rows[:n])

    def tensors(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return centre(self.reader, self.rows[start:stop], self.size)

    def loader(self, batch_size: int, device, augment: dict, seed: int, channels_last: bool, shard=None):
        if World().main:  # every shard's size and sha256, once per run (threads; seconds per 10 GB): one reader
            self.reader.verify(min(8, usable_cpus()))  # is enough, and a failure there stops every rank
        return StreamLoader(self.reader, self.rows, batch_size, device, self.size, augment, seed, channels_last,
                            self.workers, self.decode, shard)

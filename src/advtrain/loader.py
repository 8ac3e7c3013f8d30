"""The training loader for in-memory data: the whole uint8 dataset on the training device, augmented there.
(stream.py is the one for data that does not fit in memory.)"""
from __future__ import annotations

import math

from .lazy import F, torch


def random_crop(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Zero-pad by `pad` and cut each image at its own offset (dy, dx in [0, 2*pad]): one gather, no per-image loop."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: (B, H, W, C) -> (B, C, H, W)


def shard_rows(batch: slice, shard) -> slice:
    """The rows of a global batch (a slice of the epoch) that this rank takes; all of them in one process."""
    if shard is None:
        return batch
    part = shard(batch.stop - batch.start)
    return slice(batch.start + part.start, batch.start + part.stop)


class DeviceLoader:
    """Keeps the whole uint8 dataset on the training device; each epoch draws one permutation and all crop/flip
    choices at once from its own generator (so a resumed run replays the same stream), and yields float [0, 1] batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str,
                 shuffle: bool = True, crop: int = 0, flip: bool = False, seed: int = 0,
                 channels_last: bool = False, shard=None):
        self.images = images.to(device)
        self.shard = shard  # under data parallelism: this rank's slice of a global batch (it yields only that)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle, self.crop, self.flip = shuffle, crop, flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start: int = 0):
        """The epoch's batches from batch `start` on: the epoch's draws are all made (the generator ends where a
        whole epoch leaves it), the first `start` batches are skipped (a checkpoint inside an epoch resumes so)."""
        n, g = len(self.labels), self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        dy = torch.randint(0, 2 * self.crop + 1, (n,), generator=g) if self.crop else None
        dx = torch.randint(0, 2 * self.crop + 1, (n,), generator=g) if self.crop else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        order, dy, dx, flips = (t.to(self.device, non_blocking=True) if t is not None else None
                                for t in (order, dy, dx, flips))
        for first in range(start * self.batch_size, n, self.batch_size):
            sl = shard_rows(slice(first, min(first + self.batch_size, n)), self.shard)
            idx = order[sl]
            x = self.images[idx]
            if self.crop:
                x = random_crop(x, self.crop, dy[sl], dx[sl])
            x = x.float().div_(255)
            if self.flip:
                x = torch.where(flips[sl].view(-1, 1, 1, 1), x.flip(3), x)
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]

    def global_batch(self, i: int) -> int:
        """The size of global batch i (the last may be short)."""
        return min(self.batch_size, len(self.labels) - i * self.batch_size)


class InMemory:
    """A prepared in-memory split as training data (stream.ShardedData is the sharded kind): uint8 images and labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "InMemory":
        return InMemory(self.images[:n], self.labels[:n])

    def tensors(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[start:stop], self.labels[start:stop]

    def loader(self, batch_size: int, device, augment: dict, seed: int, channels_last: bool, shard=None):
        return DeviceLoader(self.images, self.labels, batch_size, device, shuffle=True, crop=augment["crop"],
                            flip=augment["flip"], seed=seed, channels_last=channels_last, shard=shard)

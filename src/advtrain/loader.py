"""The training loader for in-memory data: the whole uint8 dataset on the training device, augmented there."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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

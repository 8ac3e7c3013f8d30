"""One batch ahead on a side stream (as timm's PrefetchLoader): on CUDA, while the training stream runs step i, the
host->device copy and the device-side work (decode, crop, resize, flip, float conversion) of batch i+1 are already
queued on a stream of their own.

`prefetched(items, finish, device)` yields finish(item) for each item, in order. On CUDA, finish(item i+1) runs
with the side stream current before batch i is handed over; the training stream waits for the side stream only
where batch i+1 is handed over (wait_stream, queued after step i's kernels, so it holds up no step), and every
tensor of a handed-over batch is marked as used by the training stream (record_stream), so the caching allocator
does not give its memory to the side stream's next batch while a step still reads it. On the CPU nothing runs
ahead: finish(item) is called as the batch is asked for (there is no other stream to overlap with), unless `ahead`
asks for the look-ahead order (a test of its bookkeeping on the CPU)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from .lazy import torch


def prefetched(items: Iterable, finish: Callable[[object], tuple], device: torch.device,
               ahead: bool | None = None) -> Iterator[tuple]:
    cuda = device.type == "cuda"
    if not (cuda if ahead is None else ahead):
        for item in items:
            yield finish(item)
        return
    side = torch.cuda.Stream(device) if cuda else None
    ready = None
    for item in items:
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            following = finish(item)
        if ready is not None:
            yield ready
        ready = _hand_over(following, side, device) if cuda else following
    if ready is not None:
        yield ready


def _hand_over(batch: tuple, side, device: torch.device) -> tuple:
    """The training stream (current) waits for what the side stream queued for `batch`; its tensors are marked as
    used there (see the module's docstring)."""
    current = torch.cuda.current_stream(device)
    current.wait_stream(side)
    for t in batch:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            t.record_stream(current)
    return batch

"""A toy data source, written as a user adds a dataset: this one file plus one registry line."""
import torch

from advtrain.schema import integer
from advtrain.sources import Fetched, Source, Split


class Toy(Source):
    """28x28 grayscale noise with one bright horizontal bar; the bar's row is the class (10 classes)."""

    name = "toy"
    shape = (1, 28, 28)
    num_classes = 10
    mean = (0.2,)
    std = (0.25,)
    params = {"n": integer(10)}  # training images; the test split is a quarter of that
    defaults = {"n": 400}
    classes = [f"bar {k}" for k in range(10)]

    def split(self, n: int, seed: int) -> Split:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(20, 61, (n, *self.shape), generator=g)
        for i, k in enumerate(labels.tolist()):
            images[i, :, 4 + 2 * k:6 + 2 * k] = 220
        return Split(images.to(torch.uint8), labels)

    def fetch(self, raw_dir) -> Fetched:
        n = self.settings["n"]
        return Fetched(self.split(n, 0), self.split(n // 4, 1), self.classes, {"how": "generated", "seed": [0, 1]})

"""A LeNet-size CNN for 28x28 inputs (Fashion-MNIST): two conv + pool stages and two linear layers, small enough to
adversarially train on two CPU cores in minutes (about 1.2M multiply-adds per image at width 16, kernel 3)."""
from ..lazy import nn
from ..schema import choice, integer
from .base import Deferred, ModelSpec


@Deferred
def networks() -> tuple[type, ...]:
    class SmallCNN(nn.Module):
        def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 128,
                     kernel: int = 3):
            super().__init__()
            pad = kernel // 2
            # pool before ReLU: the same function (max-pooling commutes with a monotone ReLU), the same parameter
            # names, and the ReLU and its backward run on a quarter of the elements
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, kernel, padding=pad), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 14x14
                nn.Conv2d(width, 2 * width, kernel, padding=pad), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 7x7
            )
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(2 * width * 7 * 7, hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    return (SmallCNN,)


__getattr__ = networks.__getattr__  # SmallCNN, as an attribute of this module (base.Deferred)

SPEC = ModelSpec(
    "small_cnn",
    lambda c, k, width=16, hidden=128, kernel=3: networks.SmallCNN(c, k, width, hidden, kernel),
    {"width": integer(1), "hidden": integer(1), "kernel": choice(3, 5)},
    fits=lambda s: s[1:] == (28, 28), fits_doc="it is built for 28x28 inputs",
    paper_name=lambda p: "SmallCNN",
    gpu=False,
    cpu_threads=1,  # bf16 PGD-10 training: 1,090 img/s on one thread, 1,618 on two (docs/benchmarks.md)
)

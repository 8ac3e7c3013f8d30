"""Wide ResNet (Zagoruyko & Komodakis 2016): WRN-34-10 and WRN-28-10 are the robustness literature's large models."""
from ..lazy import F, nn
from ..schema import fail, integer, number
from .base import Deferred, ModelSpec


@Deferred
def networks() -> tuple[type, ...]:
    class WideBlock(nn.Module):
        def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.dropout = dropout
            self.shortcut = (None if in_planes == planes and stride == 1 else
                             nn.Conv2d(in_planes, planes, 1, stride, bias=False))

        def forward(self, x):
            out = F.relu(self.bn1(x))
            shortcut = x if self.shortcut is None else self.shortcut(out)
            out = self.conv1(out)
            out = F.relu(self.bn2(out))
            if self.dropout:
                out = F.dropout(out, self.dropout, self.training)
            return self.conv2(out) + shortcut

    class WideResNet(nn.Module):
        def __init__(self, depth: int = 34, width: int = 10, in_channels: int = 3, num_classes: int = 10,
                     dropout: float = 0.0):
            super().__init__()
            if (depth - 4) % 6:
                raise ValueError(f"wide_resnet depth must be 6n+4 (e.g. 28, 34), got {depth}")
            n = (depth - 4) // 6
            widths = [16, 16 * width, 32 * width, 64 * width]
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            blocks, in_planes = [], widths[0]
            for planes, stride in zip(widths[1:], (1, 2, 2)):
                for i in range(n):
                    blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                    in_planes = planes
            self.blocks = nn.Sequential(*blocks)
            self.bn = nn.BatchNorm2d(in_planes)
            self.linear = nn.Linear(in_planes, num_classes)

        def forward(self, x):
            out = F.relu(self.bn(self.blocks(self.conv1(x))))
            return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

    return WideBlock, WideResNet


__getattr__ = networks.__getattr__  # WideBlock and WideResNet, as attributes of this module (base.Deferred)


def check_depth(v, key):
    if integer(10)(v, key) and (v - 4) % 6:
        fail(key, "6n+4 (e.g. 16, 28, 34)", v)
    return v


SPEC = ModelSpec(
    "wide_resnet",
    lambda c, k, depth=34, width=10, dropout=0.0: networks.WideResNet(depth, width, c, k, dropout),
    {"depth": check_depth, "width": integer(1), "dropout": number(0, 1, hi_open=True)},
    fits=lambda s: min(s[1:]) >= 16, fits_doc="it needs images of at least 16x16",
    paper_name=lambda p: f"WideResNet-{p.get('depth', 34)}-{p.get('width', 10)}",
)

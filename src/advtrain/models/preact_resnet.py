"""PreActResNet-18 (He et al. 2016, identity mappings), the standard model of fast adversarial training."""
from ..lazy import F, nn
from .base import Deferred, ModelSpec


@Deferred
def networks() -> tuple[type, ...]:
    class PreActBlock(nn.Module):
        expansion = 1

        def __init__(self, in_planes: int, planes: int, stride: int = 1):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.shortcut = None
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

        def forward(self, x):
            out = F.relu(self.bn1(x))
            shortcut = self.shortcut(out) if self.shortcut is not None else x
            out = self.conv1(out)
            out = self.conv2(F.relu(self.bn2(out)))
            return out + shortcut

    class PreActResNet18(nn.Module):
        def __init__(self, in_channels: int = 3, num_classes: int = 10):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            layers, in_planes = [], 64
            for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
                in_planes = planes
            self.layers = nn.Sequential(*layers)
            self.bn = nn.BatchNorm2d(512)
            self.linear = nn.Linear(512, num_classes)

        def forward(self, x):
            out = F.relu(self.bn(self.layers(self.conv1(x))))
            return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

    return PreActBlock, PreActResNet18


__getattr__ = networks.__getattr__  # PreActBlock and PreActResNet18, as attributes of this module (base.Deferred)

SPEC = ModelSpec("preact_resnet18", lambda c, k: networks.PreActResNet18(c, k), fits=lambda s: min(s[1:]) >= 16,
                 fits_doc="it needs images of at least 16x16", paper_name=lambda p: "PreActResNet-18")

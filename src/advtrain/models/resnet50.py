"""ResNet-50 (He et al. 2016), torchvision's architecture: the ImageNet model of FREE, fast adversarial training and
DEAT. Built by torchvision (no weights: trained here), so a state dict is interchangeable with torchvision's."""
from .base import ModelSpec


def build(in_channels: int, num_classes: int):
    from torchvision.models import resnet50  # torchvision's import costs a second; only this model needs it

    return resnet50(weights=None, num_classes=num_classes)


SPEC = ModelSpec("resnet50", build, fits=lambda s: s[0] == 3 and min(s[1:]) >= 32,
                 fits_doc="it takes RGB images of at least 32x32", paper_name=lambda p: "ResNet-50")

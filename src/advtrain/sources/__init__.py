"""Data sources by name (see base.py for the contract). params.yaml names one per dataset: datasets.<name>.source."""
from .base import Fetched, Listed, Source, Split
from .cifar import CIFAR10, CIFAR100
from .fashionmnist import FashionMNIST
from .imagefolder import ImageFolder
from .imagenet import ImageNet

SOURCES: dict[str, type[Source]] = {s.name: s for s in (FashionMNIST, CIFAR10, CIFAR100, ImageFolder, ImageNet)}

__all__ = ["SOURCES", "Fetched", "Listed", "Source", "Split"]

"""Data sources by name (see base.py for the contract). params.yaml names one per dataset: datasets.<name>.source."""
from .base import Fetched, Source, Split
from .cifar import CIFAR10, CIFAR100
from .fashionmnist import FashionMNIST

SOURCES: dict[str, type[Source]] = {s.name: s for s in (FashionMNIST, CIFAR10, CIFAR100)}

__all__ = ["SOURCES", "Fetched", "Source", "Split"]

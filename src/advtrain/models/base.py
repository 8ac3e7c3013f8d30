"""The contract every model keeps: it takes images in [0, 1] and returns logits. Normalisation is the model's first
layer, so PGD and AutoAttack work in pixel space and the eps-ball means what it says.

A model file holds its network and a ModelSpec: how to build it, its own settings (models.<name> in params.yaml),
which image shapes it fits, and its name as papers and RobustBench write it. Its network classes are defined inside
a function wrapped in Deferred (see there): the registry's specs come without torch.
Adding a model = one new file here + one line in MODELS (models/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..lazy import nn, torch
from ..schema import Check


class Deferred:
    """A model file's nn.Module classes, defined when one is first asked for rather than when the file is imported.

    Defining a subclass of nn.Module imports torch (over a second), and the registry's specs, all that `advtrain
    check`, `advtrain aggregate` and the Snakefile read, need none of it. It decorates the function that defines and
    returns the classes; `networks.Name` is then a class. As the file's module-level __getattr__ (PEP 562) it also
    makes each class an attribute of the file under its own name, which the class keeps as its qualified name: pickle
    (MLflow logs the whole model) looks a class up so, advtrain.models.<file>.<Name>, as if it were defined at the
    top of the file."""

    def __init__(self, define: Callable[[], tuple[type, ...]]) -> None:
        self._define = define
        self._classes: dict[str, type] = {}

    def __getattr__(self, name: str) -> type:
        if not name.startswith("__"):  # a dunder is import's or pickle's probe of a module (`__path__`), not a class
            if not self._classes:
                for cls in self._define():
                    cls.__qualname__ = cls.__name__  # not define.<locals>.Name, which pickle cannot look up
                    self._classes[cls.__name__] = cls
            if name in self._classes:
                return self._classes[name]
        raise AttributeError(f"module {self._define.__module__!r} has no attribute {name!r}")


@Deferred
def networks() -> tuple[type, ...]:
    class Normalize(nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    class Classifier(nn.Module):
        """[0, 1] images -> logits."""

        def __init__(self, net: nn.Module, mean, std):
            super().__init__()
            self.normalize = Normalize(mean, std)
            self.net = net
            self.channels_last = False

        def use_channels_last(self, on: bool = True) -> Classifier:
            """Weights and activations in NHWC; inputs in any layout are converted on entry (AutoAttack passes
            NCHW)."""
            self.channels_last = on
            return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

        def forward(self, x):
            x = self.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x)

    return Normalize, Classifier


__getattr__ = networks.__getattr__  # Normalize and Classifier, as attributes of this module


def classifier(net: nn.Module, mean, std) -> nn.Module:
    """A Classifier: [0, 1] images -> the dataset's normalisation -> `net` -> logits."""
    return networks.Classifier(net, mean, std)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # (in_channels, num_classes, **params) -> nn.Module
    params: dict[str, Check] = field(default_factory=dict)  # config checks for the model's own settings
    fits: Callable[[tuple], bool] = lambda shape: True  # (C, H, W) -> whether the network takes such images
    fits_doc: str = ""
    paper_name: Callable[[dict], str] | None = None  # settings -> e.g. "WideResNet-34-10"
    # CPU threads a job of this model uses best (Snakemake's `threads:` for CPU jobs, up to the cores given). A small
    # network keeps two threads of one process only partly busy: two one-thread jobs side by side get more done.
    cpu_threads: int = 8
    # Whether `device: auto` plans a GPU for a cluster job of this model (resources.py): a network the CPU trains in
    # minutes does not need one.
    gpu: bool = True

    def architecture(self, params: dict[str, Any]) -> str:
        return self.paper_name(params) if self.paper_name else self.name

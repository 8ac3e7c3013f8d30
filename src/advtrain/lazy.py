"""torch, imported when the package first reads from it rather than when a module of the package is imported.

`import torch` takes over a second. `advtrain check`, `advtrain aggregate` and the Snakefile's parse read the
registries of methods, models, data sources and threat models for their names and settings, and touch no tensor;
the command line imports every command's modules. So the package's modules take torch, nn, F and dist from here:
each is a stand-in that imports the real module on its first attribute read and keeps every attribute it has read,
so that a later read is a plain attribute read (a PGD-10 minibatch of the small CNN makes 52 of them: about a
microsecond of its hundreds of milliseconds). For reading only: nothing assigns to torch's modules through them."""
from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A stand-in for the module `name`: the first attribute read imports it."""

    def __init__(self, name: str) -> None:
        self.__name = name  # name-mangled, so that it shadows no attribute of the module

    def __getattr__(self, attr: str) -> Any:  # called only for what the stand-in does not hold yet
        value = getattr(importlib.import_module(self.__name), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__name!r}>"


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")
dist = LazyModule("torch.distributed")

"""A classifier trained elsewhere, as a state dict: one of our architectures (models/) or torchvision's
(`torchvision:NAME`), wrapped to take [0, 1] images like every model here.

Normalisation: `dataset` (the data source's mean/std, as our models do), `inside` (the network normalises itself,
as RobustBench's models do), or explicit `M1,M2,M3/S1,S2,S3`."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import read_torch
from .errors import UserError
from .lazy import torch
from .models import MODELS, classifier

TORCHVISION = "torchvision:"


def normalisation(setting: str, info: dict) -> tuple[tuple, tuple]:
    channels = info["shape"][0]
    if setting == "dataset":
        return tuple(info["mean"]), tuple(info["std"])
    if setting == "inside":
        return (0.0,) * channels, (1.0,) * channels
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in setting.split("/"))
    except ValueError:
        mean = std = ()
    if len(mean) != channels or len(std) != channels or min(std, default=0) <= 0:
        raise UserError(f"--normalize {setting!r}: give `dataset`, `inside`, or {channels} means and {channels} "
                        "positive stds as M1,M2,.../S1,S2,...")
    return mean, std


def network(arch: str, info: dict) -> torch.nn.Module:
    if arch.startswith(TORCHVISION):
        import torchvision

        name = arch[len(TORCHVISION):]
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=info["classes"])
        except ValueError:
            raise UserError(f"--arch {arch}: torchvision has no model {name!r} (torchvision.models.list_models() "
                            "lists them)") from None
    if arch not in MODELS:
        raise UserError(f"--arch {arch!r}: one of {', '.join(MODELS)}, or torchvision:NAME")
    if not MODELS[arch].fits(tuple(info["shape"])):
        raise UserError(f"--arch {arch}: {MODELS[arch].fits_doc}")
    return MODELS[arch].build(info["shape"][0], info["classes"])


def state_dict_of(path: Path) -> dict:
    """The weights in a checkpoint file: a plain state dict, or one under `state_dict` / `model` (DataParallel's
    `module.` prefixes removed)."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    obj = read_torch(path, "checkpoint", "give a state dict saved with torch.save")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_external(path: str | Path, arch: str, info: dict, normalize: str = "dataset") -> torch.nn.Module:
    """A Classifier (models/base.py) of the weights in `path`."""
    path = Path(path)
    net = network(arch, info)
    try:
        net.load_state_dict(state_dict_of(path))
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit {arch} ({str(e).splitlines()[0][:150]})") from None
    mean, std = normalisation(normalize, info)
    return classifier(net, mean, std).eval()

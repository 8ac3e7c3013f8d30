"""A classifier trained elsewhere, as a state dict: one of our architectures (models/) or torchvision's
(`torchvision:NAME`), wrapped to take [0, 1] images like every model here.

What the file holds is taken as it comes: a plain state dict, or one under `state_dict` / `model` (this project's
own model files among them); the prefixes wrappers add to every key are dropped (DataParallel's `module.`,
torch.compile's `_orig_mod.`, a wrapper's `model.` or `net.`); our architectures are built with their settings
(models.<arch> in params.yaml, or those a model file of this project records).

Normalisation: a file that states its own (a normaliser's `mean`/`std` (or `mu`/`sigma`) beside the network, as
this project's model files and RobustBench's `Sequential(ImageNormalizer, model)` hold them) is believed. Otherwise
`dataset` (the data source's mean/std, as our models do; the default), `inside` (the network normalises itself), or
explicit `M1,M2,M3/S1,S2,S3`."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import read_torch, weights_mismatch
from .errors import UserError
from .lazy import torch
from .models import MODELS, classifier

TORCHVISION = "torchvision:"
WRAPPERS = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
HOLDERS = ("net.", "model.", "1.")  # a network under a wrapper: ours and Lightning-style modules, Sequential(norm, net)
NORMALISERS = ("", "normalize.", "normalizer.", "normalization.", "norm.", "0.")  # where a stated mean/std sits


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


def network(arch: str, info: dict, settings: dict | None = None) -> torch.nn.Module:
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
    return MODELS[arch].build(info["shape"][0], info["classes"], **(settings or {}))


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict:
    """`state` without any of `prefixes` that every key starts with (again while one does)."""
    while state:
        common = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if common is None:
            return state
        state = {k[len(common):]: v for k, v in state.items()}
    return state


def read_weights(path: Path, channels: int) -> tuple[dict, tuple | None, dict]:
    """(the network's state dict, the (mean, std) the file states or None, this project's model-file meta or {})."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    obj = read_torch(path, "checkpoint", "give a state dict saved with torch.save")
    meta = obj.get("meta") if isinstance(obj, dict) and obj.get("kind") in ("model", "teacher") else None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    state = _strip(obj, WRAPPERS)
    stated = None
    for where in NORMALISERS:
        for m, s in (("mean", "std"), ("mu", "sigma")):
            mean, std = state.get(where + m), state.get(where + s)
            if (stated is None and isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)
                    and mean.numel() == std.numel() == channels and bool((std > 0).all())):
                stated = (tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()))
                state = {k: v for k, v in state.items() if k not in (where + m, where + s)}
    return _strip(state, HOLDERS + WRAPPERS), stated, meta or {}


def load_external(path: str | Path, arch: str, info: dict, normalize: str | None = None,
                  settings: dict | None = None) -> tuple[torch.nn.Module, str]:
    """A Classifier (models/base.py) of the weights in `path`, and the normalisation it was given (`file`: the one
    the file states). `settings`: the architecture's settings from params.yaml (a model file of this project
    records its own); `normalize`: None for the file's own, else the dataset's."""
    path = Path(path)
    state, stated, meta = read_weights(path, info["shape"][0])
    if meta.get("model") == arch:
        settings = meta.get("model_kwargs", settings)
    net = network(arch, info, settings)
    why = weights_mismatch(net, state, arch, info)
    if why:
        raise UserError(f"{path}: its weights do not fit {arch}: {why}")
    if stated is not None:
        if normalize not in (None, "inside"):
            mean, std = (", ".join(f"{v:.4g}" for v in t) for t in stated)
            raise UserError(f"{path}: states its own normalisation (mean {mean}, std {std}), which is used: leave "
                            f"out --normalize {normalize}")
        return classifier(net, *stated).eval(), "file"
    normalize = normalize or "dataset"
    return classifier(net, *normalisation(normalize, info)).eval(), normalize

"""Checkpoints: the per-epoch training state (for resume) and the final model file (for evaluation).

Both are written atomically and loaded with `weights_only=True`. The model file records the architecture, dataset
and method, so loading it into the wrong model gives one clear line instead of a size-mismatch traceback."""
from __future__ import annotations

import codecs
import pickle
import zipfile
from pathlib import Path

from .errors import UserError
from .io import save_torch
from .lazy import torch
from .models import build_model

FORMAT = 1


def read_torch(path: Path, what: str, fix: str):
    """`torch.load(path, weights_only=True)` on the CPU, or one line saying the file is truncated or corrupt, or not
    a file torch.save wrote at all."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        if not zipfile.is_zipfile(path) and _is_text(path):
            raise UserError(f"{path}: a text file, not a {what} (torch.save's format): {fix}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable {what} (truncated or corrupt: {first[:120]}): {fix}") from None
    except (IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        # a file torch.save did not write, read by the weights-only unpickler as old-style pickle opcodes: it fails
        # on whatever its bytes happen to spell
        if _is_text(path):
            raise UserError(f"{path}: a text file, not a {what} (torch.save's format): {fix}") from None
        raise UserError(f"{path}: not a {what}: not a file torch.save wrote ({type(e).__name__} while reading it): "
                        f"{fix}") from None


def _is_text(path: Path) -> bool:
    """Whether the file's first 4 KB read as UTF-8 text."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        codecs.getincrementaldecoder("utf-8")().decode(head)  # (a character cut at 4 KB is no error)
    except (OSError, UnicodeDecodeError):
        return False
    return b"\x00" not in head


def _load(path: Path, what: str, fix: str) -> dict:
    obj = read_torch(path, what, fix)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path}: not an advtrain {what} (format {FORMAT}): {fix}")
    return obj


def save_training_state(path: str | Path, state: dict) -> None:
    save_torch(path, {"format": FORMAT, "kind": "training_state", **state})


def load_training_state(path: str | Path) -> dict | None:
    """The saved state, or None if there is none. A corrupt file is reported (and training starts afresh)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return _load(path, "training checkpoint", "it will be replaced by a fresh run")
    except UserError as e:
        print(f"warning: {e}", flush=True)
        return None


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_model(path: str | Path, state: dict, meta: dict, kind: str = "model", teacher: dict | None = None) -> None:
    """kind "model": a trained classifier's state dict (a teacher-based method's also holds its teacher's); kind
    "teacher": the pretrained teacher of a teacher-based method."""
    obj = {"format": FORMAT, "kind": kind, "meta": meta, "model": state}
    if teacher is not None:
        obj["teacher"] = teacher
    save_torch(path, obj)


def load_model(path: str | Path, expect: dict | None = None, kind: str = "model") -> tuple[dict, dict]:
    """(meta, state_dict) of a model file of `kind`; `expect` (e.g. {"dataset": "cifar10"}) must match its meta."""
    path = Path(path)
    verb = {"model": "train", "teacher": "pretrain"}[kind]
    fix = f"{verb} it again (`snakemake --cores 1 --force {path}`, or `advtrain {verb} METHOD DATASET`)"
    if not path.exists():
        raise UserError(f"{path}: model file missing: {verb} it first (`snakemake --cores 1 {path}`, or "
                        f"`advtrain {verb} METHOD DATASET`)")
    obj = _load(path, "model checkpoint", fix)
    if obj.get("kind") != kind:
        what = {"model": "a trained model", "teacher": "a pretrained teacher"}[kind]
        raise UserError(f"{path}: holds a {obj.get('kind')}, not {what}: {fix}")
    meta = obj["meta"]
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise UserError(f"{path}: was trained with {key}={meta.get(key)!r}, but {want!r} is expected here: "
                            f"evaluate it with the settings it was trained with, or {fix}")
    return meta, obj["model"]


def load_classifier(path: str | Path, info: dict, expect: dict | None = None, kind: str = "model"):
    """(meta, model) of a model file: the architecture is built from what the file records, for data described by
    `info` (shape, classes, mean, std)."""
    meta, state = load_model(path, expect=expect, kind=kind)
    model = build_model(meta["model"], info["shape"], info["classes"], info["mean"], info["std"], **meta["model_kwargs"])
    why = weights_mismatch(model, state, meta["model"], info)
    if why:
        raise UserError(f"{path}: its weights do not fit a {meta['model']}: {why}: retrain it")
    return meta, model


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) or "a scalar"


def weights_mismatch(module: torch.nn.Module, state: dict, arch: str, info: dict) -> str | None:
    """Load `state` into `module`: None when it fits, else what does not fit, in a few words (torch's own message
    is a paragraph per tensor)."""
    try:
        module.load_state_dict(state)
        return None
    except RuntimeError:
        pass
    own = module.state_dict()
    differ = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if differ:  # the usual cause: another number of classes, another width
        k = differ[0]
        mine, theirs = own[k], state[k]
        classes = (f" ({theirs.shape[0]} classes against {info['classes']})"
                   if mine.dim() and theirs.dim() == mine.dim() and mine.shape[0] == info["classes"]
                   and theirs.shape[1:] == mine.shape[1:] else "")
        more = f", and {len(differ) - 1} more tensors differ in shape" if len(differ) > 1 else ""
        return f"{k} is {_shape(theirs)} in the file, {_shape(mine)} in {arch}{classes}{more}"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {arch}'s tensors are not in the file (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} of the file's tensors are not in {arch} (e.g. {unexpected[0]})")
    return "; ".join(parts) or "torch refused them"

"""params.yaml: load, validate (one clear line per bad key), and resolve one (method, dataset) run.

The file has these sections (see the project's params.yaml for a commented example):
  seed, runs, datasets, models, methods, training, evaluation, tracking
`training` and `evaluation` hold defaults that a dataset may override under `datasets.<name>.training` etc.;
a method may carry its own `training`/`evaluation` keys, and all its settings may be overridden per dataset under
`methods.<method>.<dataset>`. Later wins: defaults < dataset < method < method on this dataset.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError

DATASETS: dict[str, dict[str, Any]] = {
    # shape (C, H, W), number of classes, per-channel mean/std used by the model's own normalisation layer
    "fashionmnist": {"shape": (1, 28, 28), "classes": 10, "mean": (0.2860,), "std": (0.3530,)},
    "cifar10": {"shape": (3, 32, 32), "classes": 10, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2471, 0.2435, 0.2616)},
    "cifar100": {"shape": (3, 32, 32), "classes": 100, "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)},
}


class ConfigError(UserError):
    pass


# --- value checks: each returns the normalised value or raises ConfigError naming the key -----------------------

Check = Callable[[Any, str], Any]


def _fail(key: str, want: str, got: Any) -> None:
    raise ConfigError(f"params.yaml: {key} must be {want}, got {got!r}")


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A real number; strings like '8/255' are accepted (eps and step sizes are usually written that way)."""
    lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
    want = "a number" + (f" {lo_s}" if lo_s else "") + (f" and {hi_s}" if lo_s and hi_s else (f" {hi_s}" if hi_s else ""))

    def check(v: Any, key: str) -> float:
        if isinstance(v, str):
            try:
                v = float(Fraction(v.replace(" ", "")))
            except (ValueError, ZeroDivisionError, OverflowError):
                _fail(key, want + " (or a fraction like 8/255)", v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(key, want, v)
        try:
            v = float(v)
        except OverflowError:  # an int too large for a float
            _fail(key, want, v)
        if not math.isfinite(v):
            _fail(key, "a finite " + want.removeprefix("a "), v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            _fail(key, want, v)
        if hi is not None and (v >= hi if hi_open else v > hi):
            _fail(key, want, v)
        return v

    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    want = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")

    def check(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            _fail(key, want, v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(key, want, v)
        return v

    return check


def choice(*options: Any) -> Check:
    def check(v: Any, key: str) -> Any:
        if isinstance(v, bool) and not any(isinstance(o, bool) for o in options):
            _fail(key, "one of " + ", ".join(map(str, options)), v)
        if v not in options:
            _fail(key, "one of " + ", ".join(map(str, options)), v)
        return v

    return check


def boolean(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        _fail(key, "true or false", v)
    return v


def text(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        _fail(key, "a non-empty string", v)
    return v


def optional(inner: Check) -> Check:
    def check(v: Any, key: str) -> Any:
        return None if v is None else inner(v, key)

    return check


def list_of(inner: Check, min_len: int = 0) -> Check:
    def check(v: Any, key: str) -> list:
        if not isinstance(v, list) or len(v) < min_len:
            _fail(key, f"a list of at least {min_len} item(s)", v)
        return [inner(x, f"{key}[{i}]") for i, x in enumerate(v)]

    return check


def section(schema: dict[str, Check], defaults: dict[str, Any] | None = None, extra: Callable[[str], bool] | None = None,
            extra_check: Check | None = None) -> Check:
    """A mapping with known keys; unknown keys are refused with the list of allowed ones."""

    def check(v: Any, key: str) -> dict:
        if v is None:
            v = {}
        if not isinstance(v, dict):
            _fail(key, "a mapping", v)
        out = dict(defaults or {})
        for k, val in v.items():
            sub = f"{key}.{k}" if key else str(k)
            if k in schema:
                out[k] = schema[k](val, sub)
            elif extra is not None and extra(k):
                out[k] = extra_check(val, sub) if extra_check else val
            else:
                allowed = ", ".join(sorted(schema)) or "none"
                raise ConfigError(f"params.yaml: unknown key {sub!r} (allowed here: {allowed})")
        return out

    return check


# --- the schema -----------------------------------------------------------------------------------------------------

TRAINING = {
    "epochs": integer(1),
    "batch_size": integer(1),
    "lr": number(0, lo_open=True),
    "momentum": number(0, 1, hi_open=True),
    "weight_decay": number(0),
    "schedule": choice("piecewise", "cyclic", "constant"),
    "milestones": list_of(number(0, 1, lo_open=True, hi_open=True)),
    "lr_decay": number(0, 1, lo_open=True),
    "cyclic_peak": number(0, 1, lo_open=True, hi_open=True),
    "precision": choice("auto", "bf16", "fp32"),
    "channels_last": choice("auto", True, False),
    "device": choice("auto", "cpu", "cuda"),
    "train_subset": integer(0),
}
TRAINING_DEFAULTS = {
    "epochs": 10, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "piecewise",
    "milestones": [0.5, 0.75], "lr_decay": 0.1, "cyclic_peak": 0.4, "precision": "auto", "channels_last": "auto",
    "device": "auto", "train_subset": 0,
}

EVALUATION = {
    "n_points": optional(integer(1)),  # null: the whole test set
    "batch_size": integer(1),
    "pgd_steps": integer(0),
    "pgd_restarts": integer(1),
    "pgd_alpha": optional(number(0, lo_open=True)),  # null: eps / 4
    "cw_steps": integer(0),  # CW-k: PGD on the margin loss, same restarts and step size; 0 = off
    "autoattack": choice("standard", "fast", "off"),
    "device": choice("auto", "cpu", "cuda"),
}
EVALUATION_DEFAULTS = {"n_points": None, "batch_size": 500, "pgd_steps": 20, "pgd_restarts": 1, "pgd_alpha": None,
                       "cw_steps": 20, "autoattack": "standard", "device": "auto"}

AUGMENT = {"crop": integer(0), "flip": boolean}


def _dataset_schema() -> Check:
    return section({
        "model": text,
        "eps": number(0, 1, lo_open=True),
        "alpha": number(0, 1, lo_open=True),
        "augment": section(AUGMENT, {"crop": 0, "flip": False}),
        "training": section(TRAINING),
        "evaluation": section(EVALUATION),
    })


@dataclass
class RunConfig:
    """Everything one (method, dataset) run needs, fully resolved."""

    method: str
    dataset: str
    model: str
    model_kwargs: dict
    eps: float
    alpha: float
    augment: dict
    training: dict
    method_params: dict
    evaluation: dict
    seed: int
    experiment: str
    info: dict = field(default_factory=dict)  # shape, classes, mean, std
    run_name: str | None = None  # default: METHOD_DATASET

    @property
    def name(self) -> str:
        return self.run_name or f"{self.method}_{self.dataset}"

    def train_fingerprint(self) -> str:
        """A hash of everything that changes what training computes (not evaluation settings)."""
        keys = ("method", "dataset", "model", "model_kwargs", "eps", "alpha", "augment", "training", "method_params", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, Any]:
        """Flat key -> value map for MLflow's params."""
        out: dict[str, Any] = {"method": self.method, "dataset": self.dataset, "model": self.model, "eps": self.eps,
                               "alpha": self.alpha, "seed": self.seed}
        for prefix, d in (("model", self.model_kwargs), ("augment", self.augment), ("training", self.training),
                          ("method", self.method_params)):
            for k, v in d.items():
                out[f"{prefix}.{k}"] = v
        return out


class Params:
    """A validated params.yaml."""

    def __init__(self, raw: dict, path: str = "params.yaml"):
        from .methods import METHODS
        from .models import MODELS

        self.path = path
        top = {
            "seed": integer(0),
            "runs": section({"methods": list_of(choice(*METHODS)), "datasets": list_of(choice(*DATASETS)),
                             "dynat": list_of(choice(*DATASETS))}, {"methods": [], "datasets": [], "dynat": []}),
            "datasets": section({}, extra=lambda k: k in DATASETS, extra_check=_dataset_schema()),
            "models": section({name: section(m.params) for name, m in MODELS.items()}),
            "methods": section({name: self._method_schema(m) for name, m in METHODS.items()}),
            "training": section(TRAINING, TRAINING_DEFAULTS),
            "evaluation": section(EVALUATION, EVALUATION_DEFAULTS),
            "tracking": section({"experiment": text}, {"experiment": "advtrain"}),
        }
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a YAML mapping of sections ({', '.join(top)})")
        unknown = [k for k in raw if k not in top]
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(top)})")
        # the sections (mappings) fill their own defaults from None
        self.data = {k: check(copy.deepcopy(raw.get(k, 0 if k == "seed" else None)), k) for k, check in top.items()}
        if "dynat" in self.data["runs"]["methods"]:
            raise ConfigError(f"{path}: runs.methods: list DYNAT's datasets under runs.dynat instead "
                              "(DYNAT has its own teacher-pretraining stage)")
        for dataset in self.data["datasets"]:
            self.check_dataset(dataset)
        for method, dataset in self.runs:
            self.check_run(method, dataset, where="runs")

    @staticmethod
    def _method_schema(method_cls) -> Check:
        """A method's own settings, plus `training` overrides (its reference recipe), each overridable per dataset."""
        own = {**method_cls.params, "training": section(TRAINING), "evaluation": section(EVALUATION)}
        return section(own, extra=lambda k: k in DATASETS, extra_check=section(own))

    @classmethod
    def load(cls, path: str | Path = "params.yaml") -> "Params":
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: not found (run from the project root, or pass --params PATH)")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        return cls(raw or {}, str(p))

    def check_run(self, method: str, dataset: str, where: str = "") -> None:
        from .methods import METHODS

        pre = f"{self.path}: {where}: " if where else f"{self.path}: "
        if method not in METHODS:
            raise ConfigError(f"{pre}unknown method {method!r} (known: {', '.join(METHODS)})")
        if dataset not in DATASETS:
            raise ConfigError(f"{pre}unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
        if dataset not in self.data["datasets"]:
            raise ConfigError(f"{pre}no settings for dataset {dataset!r}: add datasets.{dataset} (model, eps, alpha)")

    def check_dataset(self, dataset: str) -> None:
        from .models import MODELS

        ds = self.data["datasets"][dataset]
        for k in ("model", "eps", "alpha"):
            if k not in ds:
                raise ConfigError(f"{self.path}: datasets.{dataset}.{k} is missing")
        if ds["model"] not in MODELS:
            raise ConfigError(f"{self.path}: datasets.{dataset}.model must be one of {', '.join(MODELS)}, got {ds['model']!r}")
        shape = DATASETS[dataset]["shape"]
        if not MODELS[ds["model"]].fits(shape):
            raise ConfigError(f"{self.path}: datasets.{dataset}.model {ds['model']!r} does not fit {dataset}'s "
                              f"{'x'.join(map(str, shape))} images ({MODELS[ds['model']].fits_doc})")

    def resolve(self, method: str, dataset: str) -> RunConfig:
        from .methods import METHODS

        self.check_run(method, dataset)
        d = self.data
        ds = d["datasets"][dataset]
        mraw = d["methods"].get(method, {})
        mds = mraw.get(dataset, {})
        mparams = dict(METHODS[method].defaults)
        blocks = ("training", "evaluation")
        mparams.update({k: v for k, v in mraw.items() if k not in DATASETS and k not in blocks})
        mparams.update({k: v for k, v in mds.items() if k not in blocks})
        layered = lambda key: {**d[key], **ds.get(key, {}), **mraw.get(key, {}), **mds.get(key, {})}  # noqa: E731
        return RunConfig(
            method=method,
            dataset=dataset,
            model=ds["model"],
            model_kwargs=dict(d["models"].get(ds["model"], {})),
            eps=ds["eps"],
            alpha=ds["alpha"],
            augment=dict(ds.get("augment", {"crop": 0, "flip": False})),
            # later wins: defaults < dataset < method < method-on-this-dataset
            training=layered("training"),
            method_params=mparams,
            evaluation=layered("evaluation"),
            seed=d["seed"],
            experiment=d["tracking"]["experiment"],
            info=dict(DATASETS[dataset]),
        )

    @property
    def runs(self) -> list[tuple[str, str]]:
        """Every (method, dataset) pair of `runs`: each method on each dataset, then DYNAT on its datasets."""
        runs = self.data["runs"]
        return [(m, d) for d in runs["datasets"] for m in runs["methods"]] + [("dynat", d) for d in runs["dynat"]]

    def teacher_config(self, dataset: str) -> RunConfig:
        """DYNAT's teacher: clean (standard) training of `teacher_model` for `teacher_epochs` epochs."""
        from .models import MODELS

        cfg = self.resolve("dynat", dataset)
        p = cfg.method_params
        model = p["teacher_model"] or cfg.model
        if model not in MODELS:
            raise ConfigError(f"{self.path}: methods.dynat.teacher_model must be one of {', '.join(MODELS)}, "
                              f"got {model!r}")
        cfg.method, cfg.model, cfg.run_name = "standard", model, f"teacher_{dataset}"
        cfg.method_params = {"holdout": p["check_points"]}  # never trained on the images its accuracy is checked on
        cfg.model_kwargs = dict(self.data["models"].get(model, {}))
        cfg.training = {**cfg.training, "epochs": p["teacher_epochs"]}
        return cfg

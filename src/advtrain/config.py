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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .methods import METHODS
from .models import MODELS
from .attacks import BALLS
from .paths import run_name, teacher_name
from .schema import Check, ConfigError, boolean, choice, fail, integer, list_of, number, optional, section, text
from .sources import SOURCES, Source

# --- the schema -----------------------------------------------------------------------------------------------------

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

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
    # model selection on held-out TRAINING images (never the test split): the last val_points of the training set
    "val_points": integer(0),
    "val_pgd_steps": integer(1),  # PGD-k (step eps/4) of the per-epoch validation
    "select": choice("best", "last"),  # the epoch the model file holds: best validation robust accuracy, or last
    "ema_decay": optional(number(0, 1, lo_open=True, hi_open=True)),  # EMA of the weights, validated and published
    # data-parallel ranks (distributed.py): `advtrain train` relaunches itself under torchrun when above 1
    "devices": integer(1),
    "sync_bn": boolean,  # SyncBatchNorm across the ranks (CUDA only; on the CPU each rank normalises its shard)
    # a checkpoint inside an epoch every this many minutes (preemption.py); 0: at the ends of epochs only
    "checkpoint_minutes": number(0),
}
TRAINING_DEFAULTS = {
    "epochs": 10, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "piecewise",
    "milestones": [0.5, 0.75], "lr_decay": 0.1, "cyclic_peak": 0.4, "precision": "auto", "channels_last": "auto",
    "device": "auto", "train_subset": 0, "val_points": 0, "val_pgd_steps": 10, "select": "last", "ema_decay": None,
    "devices": 1, "sync_bn": False, "checkpoint_minutes": 30,
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
    # ranks that share each attack's batches (evaluate.py): `advtrain evaluate` relaunches itself under torchrun
    "devices": integer(1),
}
EVALUATION_DEFAULTS = {"n_points": None, "batch_size": 500, "pgd_steps": 20, "pgd_restarts": 1, "pgd_alpha": None,
                       "cw_steps": 20, "autoattack": "standard", "device": "auto", "devices": 1}

def scale_range(v: Any, key: str) -> list[float]:
    """[lo, hi]: the share of the image's area a random-resized crop keeps, 0 < lo <= hi <= 1."""
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in v) and 0 < v[0] <= v[1] <= 1):
        fail(key, "[lo, hi] with 0 < lo <= hi <= 1 (e.g. [0.08, 1], torchvision's RandomResizedCrop)", v)
    return [float(x) for x in v]


# crop: pad-and-crop by up to this many pixels; resized_crop: random-resized crop (streamed sources only); flip
AUGMENT = {"crop": integer(0), "flip": boolean, "resized_crop": optional(scale_range)}


def source_setting(v: Any, key: str) -> dict:
    """`source: NAME`, or `source: {name: NAME, <its settings>}`: normalised to the mapping."""
    want = f"one of {', '.join(SOURCES)} (the data sources), or a mapping with `name:` one of them"
    if isinstance(v, str):
        v = {"name": v}
    if not isinstance(v, dict) or "name" not in v:
        fail(key, want, v)
    if not isinstance(v["name"], str) or v["name"] not in SOURCES:  # a list or mapping is no name (nor hashable)
        fail(key, want, v["name"])
    cls = SOURCES[v["name"]]
    return {"name": v["name"], **section(cls.params, cls.defaults)({k: x for k, x in v.items() if k != "name"}, key)}


DATASET = section({
    "source": source_setting,
    "model": choice(*MODELS),
    "threat_model": choice(*BALLS),  # Linf (default) or L2: the ball eps is the radius of
    "eps": number(0, lo_open=True),
    "alpha": number(0, lo_open=True),
    "augment": section(AUGMENT, {"crop": 0, "flip": False}),
    "training": section(TRAINING),
    "evaluation": section(EVALUATION),
})


def safe_name(name: str, key: str) -> str:
    """A name that becomes part of file and folder names (data/prepared/NAME, models/METHOD_NAME_seedS.pt, the
    workflows' patterns): letters, digits, '_' and '-', starting with a letter or digit."""
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"params.yaml: {key}: {name!r} is not a usable name: it names files and folders "
                          "(data/prepared/NAME, models/METHOD_NAME_seedS.pt), so use letters, digits, '_' and '-', "
                          "starting with a letter or digit")
    return name


def source_of(settings: dict) -> Source:
    """The data source a dataset's validated `source` setting names, with its settings."""
    return SOURCES[settings["name"]]({k: v for k, v in settings.items() if k != "name"})


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
    info: dict = field(default_factory=dict)  # shape, classes, mean, std (from the data source)
    threat_model: str = "Linf"
    run_name: str | None = None  # default: METHOD_DATASET
    # the sha256 of the prepared training split (prepared.data_digest), set once the split is opened: weights are
    # only valid for the images they were trained on, so it is part of the fingerprint
    data_digest: str | None = None

    @property
    def name(self) -> str:
        return self.run_name or run_name(self.method, self.dataset, self.seed)

    def train_fingerprint(self) -> str:
        """A hash of everything that changes what training computes (not evaluation settings)."""
        keys = ("method", "dataset", "model", "model_kwargs", "threat_model", "eps", "alpha", "augment", "training",
                "method_params", "seed")
        fields = {k: getattr(self, k) for k in keys}
        # the number of ranks is left out: N ranks compute what one process computes (distributed.py), so a run
        # resumes on another number of devices; how often it checkpoints changes nothing it computes
        fields["training"] = {k: v for k, v in self.training.items() if k not in ("devices", "checkpoint_minutes")}
        if self.data_digest is not None:
            fields["data"] = self.data_digest
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, Any]:
        """Flat key -> value map for MLflow's params."""
        out: dict[str, Any] = {"method": self.method, "dataset": self.dataset, "model": self.model,
                               "threat_model": self.threat_model, "eps": self.eps, "alpha": self.alpha,
                               "seed": self.seed}
        for prefix, d in (("model", self.model_kwargs), ("augment", self.augment), ("training", self.training),
                          ("method", self.method_params)):
            for k, v in d.items():
                out[f"{prefix}.{k}"] = v
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently). A merge key
    (`<<: *anchor`) is no key of its own: the mapping's own keys override what it merges in, as YAML says."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} is given twice (line {key_node.start_mark.line + 1}): "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """One params file as a mapping, or one line saying what is wrong with the file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: not found (run from the project root, or pass --params PATH)")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not a params file (pass --params PATH/params.yaml)")
    try:
        text_ = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text (a binary file, or another encoding): save it as UTF-8 YAML") from None
    if "\x00" in text_:
        raise ConfigError(f"{p}: holds NUL bytes, so it is not a YAML text file: restore it (git checkout {p})")
    loader = _UniqueKeyLoader(text_)
    loader.name = str(p)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: must be a YAML mapping of sections, got a {type(raw).__name__}")
    return raw


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, mappings recursively, anything else replaced (as Snakemake merges configfiles)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Params:
    """A validated params.yaml."""

    TOP = ("seed", "runs", "datasets", "models", "methods", "training", "evaluation", "tracking")

    def __init__(self, raw: dict, path: str = "params.yaml"):
        self.path = path
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a YAML mapping of sections ({', '.join(self.TOP)})")
        unknown = [k for k in raw if k not in self.TOP]
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(self.TOP)})")
        raw = copy.deepcopy(raw)
        self.raw = copy.deepcopy(raw)  # as written (after merging the files), for a front end to compare with its own
        datasets = section({}, extra=lambda k: isinstance(k, str), extra_check=DATASET)(raw.get("datasets"), "datasets")
        for name in datasets:
            safe_name(name, f"datasets.{name}")
        # the runs first: a dataset they list that is not configured is the problem to name, rather than the
        # per-dataset overrides (methods.<method>.<dataset>) that its removal leaves unknown
        runs_check = section({"methods": list_of(choice(*METHODS)), "datasets": list_of(text),
                              "teacher_methods": list_of(choice(*METHODS)), "seeds": list_of(integer(0))},
                             {"methods": [], "datasets": [], "teacher_methods": [], "seeds": []})
        runs = runs_check(raw.get("runs"), "runs")
        for key, v in runs.items():
            if len(set(v)) != len(v):
                fail(f"runs.{key}", f"a list of distinct {key.replace('_', ' ')} (one is listed twice)", v)
        for d in runs["datasets"]:
            self._known_dataset(d, f"{path}: runs.datasets: ", datasets)
        top = {
            "seed": integer(0),
            "runs": runs_check,
            "models": section({name: section(m.params) for name, m in MODELS.items()}),
            # a method's settings may be overridden per configured dataset: methods.<method>.<dataset>
            "methods": section({name: self._method_schema(m, datasets) for name, m in METHODS.items()}),
            "training": section(TRAINING, TRAINING_DEFAULTS),
            "evaluation": section(EVALUATION, EVALUATION_DEFAULTS),
            "tracking": section({"experiment": text}, {"experiment": "advtrain"}),
        }
        # the sections (mappings) fill their own defaults from None
        self.data = {k: check(raw.get(k, 0 if k == "seed" else None), k) for k, check in top.items()}
        self.data["datasets"] = datasets
        runs = self.data["runs"]
        for key, want in (("methods", False), ("teacher_methods", True)):
            for m in runs[key]:
                if METHODS[m].needs_teacher != want:
                    other = "teacher_methods" if not want else "methods"
                    why = "learns from a pretrained teacher" if not want else "has no teacher"
                    raise ConfigError(f"{path}: runs.{key}: {m} {why}: list it under runs.{other} instead")
        for dataset in datasets:
            self.check_dataset(dataset)
        for method, dataset in self.runs:
            self.check_run(method, dataset, where="runs")
            if METHODS[method].needs_teacher:
                self.teacher_config(method, dataset)
            self.resolve(method, dataset)

    def require_runs(self) -> None:
        """What `advtrain check`, the Snakefile and the report need: at least one configured run."""
        runs = self.data["runs"]
        if not runs["datasets"] or not (runs["methods"] or runs["teacher_methods"]):
            raise ConfigError(f"{self.path}: runs lists no (method, dataset) pair, so the workflow has nothing to do: "
                              "set runs.datasets and runs.methods (or runs.teacher_methods)")

    @staticmethod
    def _method_schema(method_cls, datasets: dict) -> Check:
        """A method's own settings, plus `training` overrides (its reference recipe), each overridable per dataset."""
        own = {**method_cls.params, "training": section(TRAINING), "evaluation": section(EVALUATION)}
        return section(own, extra=lambda k: k in datasets, extra_check=section(own))

    @classmethod
    def load(cls, paths: str | os.PathLike | None = None) -> "Params":
        """params.yaml, or a comma-separated list of files merged in order (a base file, then overlays such as a
        test configuration). The default is $ADVTRAIN_PARAMS (the Snakefile sets it to the files Snakemake
        loaded), else params.yaml."""
        paths = str(paths or os.environ.get("ADVTRAIN_PARAMS") or "params.yaml")
        raw: dict = {}
        for p in paths.split(","):
            raw = merge(raw, read_yaml(p))
        return cls(raw, paths)

    def check_run(self, method: str, dataset: str, where: str = "") -> None:
        pre = f"{self.path}: {where}: " if where else f"{self.path}: "
        if method not in METHODS:
            raise ConfigError(f"{pre}unknown method {method!r} (known: {', '.join(METHODS)})")
        self._known_dataset(dataset, pre)

    def _known_dataset(self, dataset: str, pre: str, datasets: dict | None = None) -> None:
        datasets = self.data["datasets"] if datasets is None else datasets
        if dataset not in datasets:
            known = ", ".join(datasets) or "none"
            raise ConfigError(f"{pre}unknown dataset {dataset!r} (configured under datasets: {known}): add "
                              f"datasets.{dataset} (source, model, eps, alpha)")

    def check_dataset(self, dataset: str) -> None:
        ds = self.data["datasets"][dataset]
        for k in ("source", "model", "eps", "alpha"):
            if k not in ds:
                raise ConfigError(f"{self.path}: datasets.{dataset}.{k} is missing")
        if ds.get("threat_model", "Linf") == "Linf":  # an L-inf radius beyond 1 would allow any image
            for k in ("eps", "alpha"):
                if ds[k] > 1:
                    fail(f"datasets.{dataset}.{k}", "a number > 0 and <= 1 for the L-inf threat model", ds[k])
        source = self.source(dataset)
        if ds.get("augment", {}).get("resized_crop") and not source.streamed:
            raise ConfigError(f"{self.path}: datasets.{dataset}.augment.resized_crop needs a streamed source "
                              f"(imagefolder, imagenet); {source.name} is held in memory: use crop and flip")
        shape = tuple(source.shape)
        if not MODELS[ds["model"]].fits(shape):
            raise ConfigError(f"{self.path}: datasets.{dataset}.model {ds['model']!r} does not fit {dataset}'s "
                              f"{'x'.join(map(str, shape))} images ({MODELS[ds['model']].fits_doc})")

    def source(self, dataset: str) -> Source:
        self._known_dataset(dataset, f"{self.path}: ")
        return source_of(self.data["datasets"][dataset]["source"])

    def dataset_evaluation(self, dataset: str) -> dict:
        """A dataset's evaluation settings without any method's overrides (for a model trained elsewhere)."""
        self._known_dataset(dataset, f"{self.path}: ")
        return {**self.data["evaluation"], **self.data["datasets"][dataset].get("evaluation", {})}

    @property
    def seeds(self) -> list[int]:
        """The seeds every configured (method, dataset) runs with: runs.seeds, else the one `seed`."""
        return self.data["runs"]["seeds"] or [self.data["seed"]]

    def resolve(self, method: str, dataset: str, seed: int | None = None) -> RunConfig:
        """One run's settings; `seed` defaults to the first of `seeds`."""
        self.check_run(method, dataset)
        d = self.data
        ds = d["datasets"][dataset]
        mraw = d["methods"].get(method, {})
        mds = mraw.get(dataset, {})
        mparams = dict(METHODS[method].defaults)
        blocks = ("training", "evaluation")
        own = METHODS[method].params
        mparams.update({k: v for k, v in mraw.items() if k in own})
        mparams.update({k: v for k, v in mds.items() if k not in blocks})
        layered = lambda key: {**d[key], **ds.get(key, {}), **mraw.get(key, {}), **mds.get(key, {})}  # noqa: E731
        cfg = RunConfig(
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
            seed=self.seeds[0] if seed is None else seed,
            experiment=d["tracking"]["experiment"],
            info=self.source(dataset).info(),
            threat_model=ds.get("threat_model", "Linf"),
        )
        if cfg.threat_model not in METHODS[method].threat_models:
            able = ", ".join(m for m, c in METHODS.items() if cfg.threat_model in c.threat_models)
            raise ConfigError(f"{self.path}: {method} has no {cfg.threat_model} form (it is defined for "
                              f"{', '.join(METHODS[method].threat_models)}); for datasets.{dataset}.threat_model "
                              f"{cfg.threat_model} use one of: {able}")
        if cfg.training["select"] == "best" and not cfg.training["val_points"]:
            raise ConfigError(f"{self.path}: {cfg.name}: training.select: best needs held-out images to select on: "
                              "set training.val_points (e.g. 1000)")
        self._check_work(cfg)
        return cfg

    def _check_work(self, cfg: RunConfig, holdout: int | None = None, who: str | None = None) -> None:
        """Refuse settings that leave a stage with nothing to do (which would otherwise pass silently): no training
        image left after the held-out ones, no test point."""
        sizes = self.source(cfg.dataset).sizes
        if not sizes:  # known only once prepared: the trainer checks then
            return
        subset = cfg.training["train_subset"]
        n = min(subset, sizes["train"]) if subset else sizes["train"]
        method = METHODS[cfg.method]
        held = max(method.held_out(cfg.method_params) if holdout is None else holdout, cfg.training["val_points"])
        if n - held < 1:
            kept = (f"datasets.{cfg.dataset}.training.train_subset keeps {n}" if subset else
                    f"{cfg.dataset} has {n}")
            setting = who or f"methods.{cfg.method}.{method.held_out_key}"
            if cfg.training["val_points"] >= held:
                setting = "training.val_points"
            raise ConfigError(f"{self.path}: {cfg.name} would train on no image: {kept} training images and "
                              f"{setting} holds out {held} of them: lower {setting.rsplit('.', 1)[-1]} or keep "
                              "more training images")
        devices, last = cfg.training["devices"], (n - held) % cfg.training["batch_size"]
        if devices > 1 and 0 < last < devices:  # a rank would get an empty shard of the last minibatch
            raise ConfigError(f"{self.path}: {cfg.name}: the last minibatch would hold {last} of the {n - held} "
                              f"training images, fewer than the {devices} ranks of training.devices: change "
                              "training.batch_size or training.train_subset")
        if sizes["test"] < 1:
            raise ConfigError(f"{self.path}: {cfg.dataset} has no test image to evaluate on")

    @property
    def runs(self) -> list[tuple[str, str]]:
        """Every (method, dataset) pair of `runs`: each method, then each teacher-based method, on each dataset."""
        runs = self.data["runs"]
        return [(m, d) for d in runs["datasets"] for m in runs["methods"] + runs["teacher_methods"]]

    def teacher_config(self, method: str, dataset: str, seed: int | None = None) -> RunConfig:
        """The teacher of a teacher-based method: clean (standard) training as its `teacher_recipe` says."""
        cfg = self.resolve(method, dataset, seed)
        if not METHODS[method].needs_teacher:
            raise ConfigError(f"{self.path}: {method} has no teacher to pretrain (methods that have one: "
                              f"{', '.join(m for m, c in METHODS.items() if c.needs_teacher)})")
        recipe = METHODS[method].teacher_recipe(cfg.method_params)
        model = recipe["model"] or cfg.model
        if not MODELS[model].fits(tuple(cfg.info["shape"])):
            raise ConfigError(f"{self.path}: methods.{method}.teacher_model {model!r} does not fit {dataset}'s images "
                              f"({MODELS[model].fits_doc})")
        cfg.method, cfg.model, cfg.run_name = "standard", model, teacher_name(method, dataset, cfg.seed)
        cfg.method_params = {"holdout": recipe["holdout"]}
        cfg.model_kwargs = dict(self.data["models"].get(model, {}))
        cfg.training = {**cfg.training, "epochs": recipe["epochs"]}
        self._check_work(cfg, who=f"methods.{method}.{METHODS[method].held_out_key}")
        return cfg

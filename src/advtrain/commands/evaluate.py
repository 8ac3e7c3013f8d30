"""`advtrain evaluate METHOD DATASET`: clean, PGD, CW and AutoAttack accuracy of a trained model on the test split,
written to results/METHOD_DATASET.json and logged into the run's MLflow run. With `evaluation.devices` above 1 it
runs itself under torchrun: the ranks share every attack's batches (evaluate.py), and rank 0 alone writes the result
and logs it.

A finished evaluation is kept under its key (the model file's sha256 and the evaluation settings): asked again for
the same model and settings, after any number of other attempts, it re-publishes that result in seconds."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import resources
from ..checkpoint import load_classifier
from ..config import SAFE_NAME, Params
from ..distributed import World
from ..console import claim_log, log
from ..summary import summarise
from ..errors import UserError
from ..evaluate import evaluate, fingerprint
from ..external import load_external
from ..io import sha256_file, write_json
from ..models import MODELS
from ..locking import exclusive
from ..paths import eval_done_path, eval_state_path, model_path, prepared_dir, result_path, run_lock, seed_result_path
from ..prepared import load_split
from ..provenance import versions
from ..relaunch import relaunch_under_torchrun
from ..robustbench import model_info
from ..tracking import log_result, warm_up
from ..trainer import pick_device


def run(params: Params, method: str, dataset: str, seed: int | None = None,
        argv: list[str] | None = None) -> dict | None:
    cfg = params.resolve(method, dataset, seed)
    ev = cfg.evaluation
    resources.require_planned_gpus(resources.planned_gpus(ev["device"], cfg.model, ev["devices"]), cfg.name,
                                   f"evaluation.device {ev['device']} with {cfg.model}")
    resume = lambda: f"the same command resumes its {ev['devices']} ranks from their saved batches"  # noqa: E731
    if relaunch_under_torchrun(cfg.name, "evaluation.devices", ev["devices"], ev["device"], argv, "evaluate", resume):
        return None
    world = World()
    if not world.main:  # the ranks beside the main one attack their batches and write nothing but their own state
        return _run(cfg, method, dataset, world)
    with exclusive(run_lock(cfg.name), f"training or evaluating {cfg.name}"):
        claim_log()
        return _run(cfg, method, dataset, world)


def _run(cfg, method: str, dataset: str, world: World) -> dict | None:
    mpath = model_path(method, dataset, cfg.seed)
    meta, model = load_classifier(mpath, cfg.info, expect={"method": cfg.method, "dataset": cfg.dataset,
                                                           "model": cfg.model})
    model.use_channels_last(cfg.training["channels_last"] is not False)  # same numbers, faster (see trainer.py)
    images, labels, data_meta = load_split(prepared_dir(dataset), "test", cfg.evaluation["n_points"])
    ev = cfg.evaluation
    n, n_test = len(labels), data_meta["n_test"]
    x, y = images, labels  # uint8: evaluate makes each batch float
    device = world.device(pick_device(ev["device"]))  # one GPU per rank: cuda:LOCAL_RANK
    key = fingerprint(mpath, cfg.eps, ev, cfg.seed, n, cfg.threat_model)
    rpath, done = seed_result_path(method, dataset, cfg.seed), eval_done_path(cfg.name, key)
    if done.exists():  # every rank sees it (none is written before every rank has looked)
        if not world.main:
            return None
        record = json.loads(done.read_text())
        log(f"[evaluate] {cfg.name}: this model was evaluated with these settings before: publishing that result "
            f"({done})")
        return publish(cfg, record, rpath, data_meta)
    ranks = f" x {world.size} ranks" if world.on else ""
    if world.main:
        log(f"[evaluate] {cfg.name}: {n} test points, {cfg.threat_model} eps {cfg.eps:.4g}, AutoAttack "
            f"{ev['autoattack']}, on {device}{ranks}")
        warm_up()  # the result is logged to MLflow at the end
    t0 = time.perf_counter()
    spath = eval_state_path(cfg.name, key, world.rank)
    rank_log = log if world.main else (lambda msg: log(f"[rank {world.rank}] {msg}"))
    # a rank may wait at a stage's merge while the others attack the rest of their batches (after a resume, all of
    # them: hours of AutoAttack on ImageNet): the job's time limit bounds the wait, not torch's 30 minutes
    world.start(device, timeout_minutes=resources.RUNTIME_MIN["evaluate"])
    try:
        res = evaluate(model, x, y, cfg.eps, ev, cfg.seed, device, rank_log, state_path=spath, key=key,
                       norm=cfg.threat_model, world=world)
        world.barrier()  # every rank past its last save: rank 0 alone goes on to write the result
    finally:
        world.stop()
    if not world.main:  # its state goes with the others' once rank 0 has kept the result
        return None
    architecture = MODELS[meta["model"]].architecture(meta["model_kwargs"])
    record = {
        "method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, "model": cfg.model,
        "threat_model": cfg.threat_model, "eps": cfg.eps, **res,
        "train": meta.get("train", {}),
        "selection": meta.get("selection"),
        "eval_seconds": time.perf_counter() - t0,
        "mlflow_run_key": meta.get("mlflow_run_key"),
        "versions": versions(),
        "class_names": data_meta.get("classes"),
        "robustbench": model_info(cfg.method, cfg.dataset, cfg.threat_model, cfg.eps, architecture, res, n_test),
    }
    write_json(done, record)
    spath.unlink(missing_ok=True)
    for other in spath.parent.glob(f"{spath.stem}.rank*.pt"):  # the other ranks' states (of any number of ranks)
        other.unlink(missing_ok=True)
    return publish(cfg, record, rpath, data_meta)


def run_external(params: Params, dataset: str, file: str, arch: str, normalize: str | None = None,
                 name: str | None = None) -> dict:
    """A checkpoint trained elsewhere, evaluated with the dataset's settings: the same stages, the same result JSON
    (results/NAME_DATASET.json, a run of one seed), and a row of the report when its dataset is reported."""
    cfg = params.resolve("standard", dataset)  # the dataset's eps, threat model and evaluation settings
    cfg.evaluation = params.dataset_evaluation(dataset)
    if name is not None and not SAFE_NAME.fullmatch(name):  # it names results/NAME_DATASET.json
        raise UserError(f"--name {name!r}: it names results/NAME_{dataset}.json, so use letters, digits, '_' and '-', "
                        "starting with a letter or digit")
    name = name or f"external-{Path(file).stem}"
    # the normalisation the file states, else --normalize (the dataset's by default); our architectures with their
    # settings in params.yaml (models.ARCH)
    model, normalize = load_external(file, arch, cfg.info, normalize, params.data["models"].get(arch, {}))
    model.use_channels_last(cfg.training["channels_last"] is not False)
    images, labels, data_meta = load_split(prepared_dir(dataset), "test", cfg.evaluation["n_points"])
    ev = cfg.evaluation
    n, n_test = len(labels), data_meta["n_test"]
    device = pick_device(ev["device"])
    if ev["devices"] > 1:
        log(f"[evaluate] {name}: a checkpoint trained elsewhere is evaluated on one device (evaluation.devices "
            f"{ev['devices']} applies to `advtrain evaluate METHOD DATASET`)")
    log(f"[evaluate] {name} ({arch}, {file}) on {dataset}: {n} test points, {cfg.threat_model} eps {cfg.eps:.4g}, "
        f"AutoAttack {ev['autoattack']}, on {device}")
    t0 = time.perf_counter()
    res = evaluate(model, images, labels, cfg.eps, ev, cfg.seed, device, log,
                   norm=cfg.threat_model)
    record = {
        "method": name, "dataset": dataset, "seed": cfg.seed, "model": arch, "threat_model": cfg.threat_model,
        "eps": cfg.eps, **res, "train": {}, "selection": None, "eval_seconds": time.perf_counter() - t0,
        "external": {"file": str(file), "sha256": sha256_file(file), "arch": arch, "normalize": normalize},
        "versions": versions(), "class_names": data_meta.get("classes"),
        "robustbench": model_info(name, dataset, cfg.threat_model, cfg.eps, arch, res, n_test),
    }
    record = summarise([cfg.seed], [record])
    out = result_path(name, dataset)
    write_json(out, record)
    log(f"[evaluate] {name}: clean {100 * res['clean_acc']:.2f}%, robust (min over attacks) "
        f"{100 * res['robust_acc']:.2f}% -> {out}")
    return record


def publish(cfg, record: dict, rpath, data_meta: dict) -> dict:
    write_json(rpath, record)
    log_result(cfg, record, rpath, log, prepared_dir(cfg.dataset), data_meta)
    aa = f", AutoAttack {100 * record['autoattack']['robust_acc']:.2f}%" if "autoattack" in record else ""
    log(f"[evaluate] {cfg.name}: clean {100 * record['clean_acc']:.2f}%{aa}, robust (min over attacks) "
        f"{100 * record['robust_acc']:.2f}% -> {rpath}")
    return record

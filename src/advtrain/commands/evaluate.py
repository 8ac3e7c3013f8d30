"""`advtrain evaluate METHOD DATASET`: clean, PGD, CW and AutoAttack accuracy of a trained model on the test split,
written to results/METHOD_DATASET.json and logged into the run's MLflow run.

A finished evaluation is kept under its key (the model file's sha256 and the evaluation settings): asked again for
the same model and settings, after any number of other attempts, it re-publishes that result in seconds."""
from __future__ import annotations

import json
import time

from ..checkpoint import load_classifier
from ..config import Params
from ..console import log
from ..evaluate import evaluate, fingerprint
from ..io import write_json
from ..models import MODELS
from ..locking import exclusive
from ..paths import eval_done_path, eval_state_path, model_path, prepared_dir, result_path, run_lock
from ..prepared import load_split
from ..provenance import versions
from ..robustbench import model_info
from ..tracking import log_result
from ..trainer import pick_device


def run(params: Params, method: str, dataset: str) -> dict:
    cfg = params.resolve(method, dataset)
    with exclusive(run_lock(cfg.name), f"training or evaluating {cfg.name}"):
        return _run(cfg, method, dataset)


def _run(cfg, method: str, dataset: str) -> dict:
    mpath = model_path(method, dataset)
    meta, model = load_classifier(mpath, cfg.info, expect={"method": cfg.method, "dataset": cfg.dataset,
                                                           "model": cfg.model})
    model.use_channels_last(cfg.training["channels_last"] is not False)  # same numbers, faster (see trainer.py)
    images, labels, data_meta = load_split(prepared_dir(dataset), "test")
    ev = cfg.evaluation
    n = min(ev["n_points"] or len(labels), len(labels))
    x, y = images[:n].float().div(255), labels[:n]
    device = pick_device(ev["device"])
    key = fingerprint(mpath, cfg.eps, ev, cfg.seed, n)
    rpath, done = result_path(method, dataset), eval_done_path(cfg.name, key)
    if done.exists():
        record = json.loads(done.read_text())
        log(f"[evaluate] {cfg.name}: this model was evaluated with these settings before: publishing that result "
            f"({done})")
        return publish(cfg, record, rpath)
    log(f"[evaluate] {cfg.name}: {n} test points, eps {cfg.eps:.4g}, AutoAttack {ev['autoattack']}, on {device}")
    t0 = time.perf_counter()
    spath = eval_state_path(cfg.name, key)
    res = evaluate(model, x, y, cfg.eps, ev, cfg.seed, device, log, state_path=spath, key=key)
    architecture = MODELS[meta["model"]].architecture(meta["model_kwargs"])
    record = {
        "method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "threat_model": "Linf", "eps": cfg.eps,
        **res,
        "train": meta.get("train", {}),
        "eval_seconds": time.perf_counter() - t0,
        "mlflow_run_key": meta.get("mlflow_run_key"),
        "versions": versions(),
        "class_names": data_meta.get("classes"),
        "robustbench": model_info(cfg.method, cfg.dataset, cfg.eps, architecture, res, len(labels)),
    }
    write_json(done, record)
    spath.unlink(missing_ok=True)
    return publish(cfg, record, rpath)


def publish(cfg, record: dict, rpath) -> dict:
    write_json(rpath, record)
    log_result(cfg, record, rpath, log)
    aa = f", AutoAttack {100 * record['autoattack']['robust_acc']:.2f}%" if "autoattack" in record else ""
    log(f"[evaluate] {cfg.name}: clean {100 * record['clean_acc']:.2f}%{aa}, robust (min over attacks) "
        f"{100 * record['robust_acc']:.2f}% -> {rpath}")
    return record

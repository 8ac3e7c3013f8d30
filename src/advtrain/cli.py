"""`advtrain`: one command, one sub-command per pipeline stage. Snakemake and DVC both call exactly these.

  advtrain prepare DATASET            -> data/prepared/DATASET/{train.pt,test.pt,meta.json}
  advtrain pretrain DATASET           -> models/teacher_DATASET.pt (DYNAT's teacher), metrics/train/teacher_DATASET.json
  advtrain train METHOD DATASET       -> models/METHOD_DATASET.pt, metrics/train/METHOD_DATASET.json
  advtrain evaluate METHOD DATASET    -> results/METHOD_DATASET.json
  advtrain report                     -> reports/report.html, reports/report.md
  advtrain sync METHOD DATASET        log a run's local records to MLflow (if the store was unreachable)
  advtrain check                      validate params.yaml and list the configured runs
  advtrain bench [--size tiny|small|full] ...   speed of every method against a seed-style loop (docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from .errors import UserError


# The path conventions, in one place (the Snakefile and dvc.yaml spell the same patterns).
def prepared_dir(dataset: str) -> Path:
    return Path("data/prepared") / dataset


def model_path(method: str, dataset: str) -> Path:
    return Path("models") / f"{method}_{dataset}.pt"


def train_metrics_path(method: str, dataset: str) -> Path:
    return Path("metrics/train") / f"{method}_{dataset}.json"


def result_path(method: str, dataset: str) -> Path:
    return Path("results") / f"{method}_{dataset}.json"


def log(msg: str) -> None:
    print(msg, flush=True)


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "pyautoattack", "mlflow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return out


def cmd_prepare(args) -> None:
    from .data import prepare

    meta = prepare(args.dataset, args.out or prepared_dir(args.dataset), args.raw)
    log(f"[prepare] {args.dataset}: {meta['n_train']} train / {meta['n_test']} test images "
        f"{'x'.join(map(str, meta['shape']))} from {meta['source']['how']} -> {args.out or prepared_dir(args.dataset)}")


def teacher_path(dataset: str) -> Path:
    return Path("models") / f"teacher_{dataset}.pt"


def run_training(cfg, out_model: Path, out_metrics: Path, restart: bool, kind: str = "model", teacher=None) -> None:
    """Train (or resume) one configuration, then write its model file and metrics JSON, logged to MLflow."""
    from .checkpoint import save_model
    from .data import load_split
    from .io import write_json
    from .tracking import TrainingTracker, tracking_uri
    from .trainer import Trainer

    images, labels, meta = load_split(prepared_dir(cfg.dataset), "train")
    tracker = TrainingTracker(cfg.experiment, log=log)
    # the resumable training state is deliberately NOT a declared output (Snakemake and DVC delete those)
    trainer = Trainer(cfg, images, labels, Path("checkpoints") / f"{cfg.name}.pt", callbacks=[tracker], log=log,
                      teacher=teacher)
    try:
        history = trainer.fit(resume=not restart)
    except BaseException as e:
        tracker.finish(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    totals = {"seconds": sum(h["seconds"] for h in history), "passes": sum(h["passes"] for h in history),
              "optimizer_steps": sum(h["optimizer_steps"] for h in history), "epochs": len(history)}
    model_meta = {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
                  "shape": list(cfg.info["shape"]), "num_classes": cfg.info["classes"], "eps": cfg.eps,
                  "fingerprint": cfg.train_fingerprint(), "mlflow_run_key": trainer.run_key, "train": totals,
                  "stop_reason": trainer.stop_reason, "data_sha256": meta["sha256"]["train.pt"]}
    save_model(out_model, trainer.model, model_meta, kind=kind, teacher=getattr(trainer.method, "teacher", None))
    write_json(out_metrics, {"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model,
                             "params": cfg.flat_params(), "device": str(trainer.device), "bf16": trainer.use_bf16,
                             "totals": totals, "stop_reason": trainer.stop_reason, "mlflow_run_id": trainer.run_id,
                             "mlflow_run_key": trainer.run_key, "mlflow_tracking_uri": tracking_uri(),
                             "versions": versions(), "epochs": history})
    tracker.log_totals(totals, len(history))
    if trainer.stop_reason:
        tracker.set_tags({"stop_reason": trainer.stop_reason[:5000]})
    tracker.log_artifacts([out_metrics])
    tracker.finish()
    log(f"[train] {cfg.name}: {totals['epochs']} epochs, {totals['passes']:g} forward/backward passes, "
        f"{totals['seconds']:.1f}s -> {out_model}")


def cmd_pretrain(args) -> None:
    from .config import Params

    cfg = Params.load(args.params).teacher_config(args.dataset)
    run_training(cfg, teacher_path(args.dataset), train_metrics_path("teacher", args.dataset), args.restart,
                 kind="teacher")


def load_classifier(path: Path, cfg, expect: dict, kind: str = "model"):
    """(meta, model) of a model file, the architecture built from what the file records."""
    from .checkpoint import load_model
    from .models import build_model

    meta, state = load_model(path, expect=expect, kind=kind)
    info = cfg.info
    model = build_model(meta["model"], info["shape"], info["classes"], info["mean"], info["std"], **meta["model_kwargs"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit a {meta['model']} ({str(e).splitlines()[0][:150]}): "
                        "retrain it") from None
    return meta, model


def load_teacher(cfg):
    """DYNAT's pretrained teacher."""
    return load_classifier(teacher_path(cfg.dataset), cfg, expect={"dataset": cfg.dataset}, kind="teacher")[1]


def cmd_train(args) -> None:
    from .config import Params

    cfg = Params.load(args.params).resolve(args.method, args.dataset)
    teacher = load_teacher(cfg) if args.method == "dynat" else None
    run_training(cfg, model_path(args.method, args.dataset), train_metrics_path(args.method, args.dataset),
                 args.restart, teacher=teacher)


def eval_state_path(method: str, dataset: str) -> Path:
    """An unfinished evaluation's resumable state (removed once the result is written)."""
    return Path("checkpoints/eval") / f"{method}_{dataset}.pt"


def robustbench_info(cfg, meta: dict, res: dict, n_test: int) -> dict:
    """The result in RobustBench's model-info shape (accuracies as percent strings, eps as a fraction)."""
    from fractions import Fraction

    from .models import architecture_name

    k = cfg.eps * 255
    eps = f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else str(Fraction(cfg.eps).limit_denominator(10_000))
    aa = res.get("autoattack", {})
    return {"name": f"advtrain {cfg.method}", "dataset": cfg.dataset, "threat_model": "Linf", "eps": eps,
            "architecture": architecture_name(meta["model"], meta["model_kwargs"]), "additional_data": False,
            "number_forward_passes": 1, "clean_acc": f"{100 * res['clean_acc']:.2f}",
            "autoattack_acc": f"{100 * aa['robust_acc']:.2f}" if aa else None,
            "autoattack_version": aa.get("version"), "n_points": res["n_points"],
            "full_test_set": res["n_points"] == n_test}


def cmd_evaluate(args) -> None:
    from .config import Params
    from .data import load_split
    from .evaluate import evaluate, fingerprint
    from .io import write_json
    from .trainer import pick_device

    cfg = Params.load(args.params).resolve(args.method, args.dataset)
    mpath = model_path(args.method, args.dataset)
    meta, model = load_classifier(mpath, cfg, expect={"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model})
    model.use_channels_last(cfg.training["channels_last"] is not False)  # same numbers, faster (see trainer.py)
    images, labels, data_meta = load_split(prepared_dir(args.dataset), "test")
    ev = cfg.evaluation
    n = min(ev["n_points"] or len(labels), len(labels))
    x, y = images[:n].float().div(255), labels[:n]
    device = pick_device(ev["device"])
    log(f"[evaluate] {cfg.name}: {n} test points, eps {cfg.eps:.4g}, AutoAttack {ev['autoattack']}, on {device}")
    t0 = time.perf_counter()
    spath = eval_state_path(args.method, args.dataset)
    res = evaluate(model, x, y, cfg.eps, ev, cfg.seed, device, log, state_path=spath,
                   key=fingerprint(mpath, cfg.eps, ev, cfg.seed, n))
    record = {
        "method": cfg.method, "dataset": cfg.dataset, "model": cfg.model, "threat_model": "Linf", "eps": cfg.eps,
        **res,
        "train": meta.get("train", {}),
        "eval_seconds": time.perf_counter() - t0,
        "mlflow_run_key": meta.get("mlflow_run_key"),
        "versions": versions(),
        "class_names": data_meta.get("classes"),
        "robustbench": robustbench_info(cfg, meta, res, len(labels)),
    }
    rpath = result_path(args.method, args.dataset)
    write_json(rpath, record)
    spath.unlink(missing_ok=True)
    log_result(cfg, record, rpath)
    aa = f", AutoAttack {100 * res['autoattack']['robust_acc']:.2f}%" if "autoattack" in res else ""
    log(f"[evaluate] {cfg.name}: clean {100 * res['clean_acc']:.2f}%{aa}, robust (min over attacks) "
        f"{100 * res['robust_acc']:.2f}% -> {rpath}")


def eval_metrics(res: dict) -> dict:
    """The flat MLflow metrics of a result record."""
    flat = {"eval_clean_acc": res["clean_acc"], "eval_robust_acc": res["robust_acc"], "eval_n_points": res["n_points"]}
    for family in ("pgd", "cw"):
        if family in res:
            flat[f"eval_{family}_acc"] = res[family]["acc"]
    if "autoattack" in res:
        for attack, acc in res["autoattack"]["robust_acc_after"].items():
            flat[f"eval_aa_{attack}"] = acc
        flat["eval_autoattack_acc"] = res["autoattack"]["robust_acc"]
    return flat


def log_result(cfg, record: dict, rpath: Path) -> None:
    from .tracking import Tracker

    tracker = Tracker(cfg.experiment, log=log)
    if tracker.open_run(cfg.name, record.get("mlflow_run_key"), tags={"method": cfg.method, "dataset": cfg.dataset}):
        tracker.log_metrics(eval_metrics(record))
        tracker.log_artifacts([rpath])
        tracker.finish()


def cmd_sync(args) -> None:
    """Log a run's local record (metrics JSON, result JSON) into the MLflow store now reachable."""
    import json

    from .config import Params
    from .tracking import Tracker, tracking_uri

    cfg = Params.load(args.params).resolve(args.method, args.dataset)
    mpath = train_metrics_path(args.method, args.dataset)
    if not mpath.exists():
        raise UserError(f"{mpath}: no local training record to log: train it first (`advtrain train "
                        f"{args.method} {args.dataset}`)")
    metrics = json.loads(mpath.read_text())
    tracker = Tracker(cfg.experiment, log=log)
    key = metrics.get("mlflow_run_key")
    if not tracker.open_run(cfg.name, key, tags={"method": cfg.method, "dataset": cfg.dataset, "model": cfg.model}):
        raise UserError(f"MLflow store {tracking_uri()} is still unreachable: set MLFLOW_TRACKING_URI to a reachable "
                        "one and rerun `advtrain sync`")
    tracker.log_params(metrics["params"])
    tracker.log_epochs(metrics["epochs"])
    if not tracker.logged_steps("train_total_epochs"):
        tracker.log_totals(metrics["totals"], len(metrics["epochs"]))
    tracker.log_artifacts([mpath])
    tracker.finish()
    rpath = result_path(args.method, args.dataset)
    if rpath.exists():
        log_result(cfg, json.loads(rpath.read_text()), rpath)
    log(f"[sync] {cfg.name}: {len(metrics['epochs'])} epochs{' and the evaluation' if rpath.exists() else ''} "
        f"logged to {tracking_uri()} (run {tracker.run_id})")


def cmd_report(args) -> None:
    from .config import Params
    from .report import build_report

    params = Params.load(args.params)
    runs = params.runs
    if not runs:
        raise UserError(f"{args.params}: `runs` is empty: list the (method, dataset) pairs the report should compare")
    missing = [str(result_path(m, d)) for m, d in runs if not result_path(m, d).exists()]
    if missing:
        raise UserError(f"missing results: {', '.join(missing)}: run `snakemake --cores 2 reports/report.html` "
                        "(or `dvc repro`) to compute them")
    html, md = build_report(runs, Path(args.out))
    log(f"[report] {len(runs)} runs -> {html}, {md}")
    from .tracking import Tracker

    tracker = Tracker(params.data["tracking"]["experiment"], log=log)  # the report and its figures, as artifacts of a run "report"
    if tracker.open_run("report", "report", tags={"kind": "report"}):
        tracker.log_artifacts([html, md])
        tracker.log_artifacts(sorted((Path(args.out) / "figures").glob("*.png")), "figures")
        tracker.finish()


def cmd_check(args) -> None:
    from .config import Params

    params = Params.load(args.params)
    for m, d in params.runs:
        params.resolve(m, d)
    log(f"{args.params}: valid; runs: " + (", ".join(f"{m}_{d}" for m, d in params.runs) or "none"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="advtrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the settings file (default: params.yaml)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fetch/verify a dataset and store it as uint8 tensors")
    p.add_argument("dataset")
    p.add_argument("--out", help="output folder (default: data/prepared/DATASET)")
    p.add_argument("--raw", default="data/raw", help="where downloads go (default: data/raw)")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("train", help="train METHOD on DATASET (resumes from its last completed epoch)")
    p.add_argument("method")
    p.add_argument("dataset")
    p.add_argument("--restart", action="store_true", help="ignore a saved training state and start afresh")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("pretrain", help="clean training of DYNAT's teacher for DATASET (methods.dynat.teacher_epochs)")
    p.add_argument("dataset")
    p.add_argument("--restart", action="store_true", help="ignore a saved training state and start afresh")
    p.set_defaults(fn=cmd_pretrain)
    p = sub.add_parser("evaluate", help="clean, PGD and AutoAttack accuracy of a trained model")
    p.add_argument("method")
    p.add_argument("dataset")
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("sync", help="log a run's local records to MLflow (after the store was unreachable)")
    p.add_argument("method")
    p.add_argument("dataset")
    p.set_defaults(fn=cmd_sync)
    p = sub.add_parser("report", help="HTML + Markdown report over every configured run")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("check", help="validate params.yaml")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("bench", help="speed benchmark against a seed-style loop (`advtrain bench --help`)",
                       add_help=False)
    p.set_defaults(fn=None)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options (docs/benchmarks.md)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

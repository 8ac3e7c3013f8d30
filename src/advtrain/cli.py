"""`advtrain`: one command, one sub-command per pipeline stage. Snakemake and DVC both call exactly these.

  advtrain prepare DATASET                  -> data/prepared/DATASET/{train.pt,test.pt,meta.json}
  advtrain pretrain METHOD DATASET [--seed S] -> models/teachers/METHOD_DATASET_seedS.pt (a teacher-based method's)
  advtrain train METHOD DATASET [--seed S]  -> models/METHOD_DATASET_seedS.pt, metrics/train/METHOD_DATASET_seedS.json
  advtrain evaluate METHOD DATASET [--seed S] -> results/seeds/METHOD_DATASET_seedS.json
  advtrain aggregate METHOD DATASET         -> results/METHOD_DATASET.json (over the seeds of runs.seeds)
  advtrain report                           -> reports/report.html, reports/report.md
  advtrain sync METHOD DATASET [--seed S]   log a run's local records to MLflow (if the store was unreachable)
  advtrain check                            validate params.yaml and list the configured runs

Paths are relative to the project root (src/advtrain/paths.py); every setting comes from params.yaml. --seed
defaults to the first of runs.seeds.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .commands import aggregate, check, evaluate, prepare, report, sync, train
from .config import Params
from .console import claim_log, crashed, error, interrupted, tee_to
from .errors import UserError
from .preemption import Preempted


LOCKING = ("train", "pretrain", "evaluate")  # the commands that hold a run's lock while they work


def run_evaluate(a: argparse.Namespace, params: Params) -> None:
    if a.model:
        claim_log()  # a model trained elsewhere has no run lock to wait for
        if len(a.names) != 1 or not a.arch:
            raise UserError("evaluate --model FILE needs --arch NAME and one DATASET: advtrain evaluate --model FILE "
                            "--arch NAME DATASET")
        evaluate.run_external(params, a.names[0], a.model, a.arch, a.normalize, a.name)
    elif len(a.names) != 2:
        raise UserError("evaluate needs METHOD DATASET (or --model FILE --arch NAME DATASET)")
    else:
        evaluate.run(params, a.names[0], a.names[1], a.seed, a.argv)


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method")
    p.add_argument("dataset")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default: the first of runs.seeds)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="advtrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None,
                    help="the settings file, or a comma-separated list merged in order (default: $ADVTRAIN_PARAMS, "
                         "else params.yaml)")
    ap.add_argument("--log", default=None, metavar="FILE", help="also write everything printed to FILE")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fetch/verify a dataset and store it as uint8 tensors")
    p.add_argument("dataset")
    p.add_argument("--out", help="output folder (default: data/prepared/DATASET)")
    p.add_argument("--raw", default="data/raw", help="where downloads go (default: data/raw)")
    p.set_defaults(fn=lambda a, params: prepare.run(params, a.dataset, a.out, a.raw))
    for name, fn, what in (("train", train.train, "train METHOD on DATASET"),
                           ("pretrain", train.pretrain, "clean training of the teacher a teacher-based METHOD learns "
                                                        "from on DATASET")):
        p = sub.add_parser(name, help=f"{what} (resumes from its last completed epoch)")
        run_arguments(p)
        p.add_argument("--restart", action="store_true", help="ignore a saved training state and start afresh")
        p.set_defaults(fn=lambda a, params, fn=fn: fn(params, a.method, a.dataset, a.seed, a.restart, a.argv))
    p = sub.add_parser("evaluate", help="clean, PGD, CW and AutoAttack accuracy of a trained model (METHOD DATASET), "
                                        "or of a checkpoint trained elsewhere (--model FILE --arch NAME DATASET)")
    p.add_argument("names", nargs="+", metavar="METHOD DATASET | DATASET")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default: the first of runs.seeds)")
    p.add_argument("--model", metavar="FILE", help="a state dict trained elsewhere (plain, or under state_dict/model)")
    p.add_argument("--arch", help="its architecture: one of our models, or torchvision:NAME (e.g. torchvision:resnet18)")
    p.add_argument("--normalize", default=None, metavar="HOW",
                   help="for a file that does not state its own normalisation (a mean/std beside the network): "
                        "dataset (its mean/std; default), inside (the model normalises itself), or M1,M2,.../S1,S2,...")
    p.add_argument("--name", help="its name in the results and report (default: external-FILESTEM)")
    p.set_defaults(fn=run_evaluate)
    p = sub.add_parser("aggregate", help="a (method, dataset) over the seeds of runs.seeds: mean, std, intervals")
    p.add_argument("method")
    p.add_argument("dataset")
    p.set_defaults(fn=lambda a, params: aggregate.run(params, a.method, a.dataset))
    p = sub.add_parser("sync", help="log a run's local records to MLflow (after the store was unreachable)")
    run_arguments(p)
    p.set_defaults(fn=lambda a, params: sync.run(params, a.method, a.dataset, a.seed))
    p = sub.add_parser("report", help="HTML + Markdown report over every configured run")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.set_defaults(fn=lambda a, params: report.run(params, a.out))
    p = sub.add_parser("check", help="validate params.yaml")
    p.add_argument("--out", metavar="FILE", help="once valid, write a marker file (dvc.yaml's check stage)")
    p.set_defaults(fn=lambda a, params: check.run(params, a.out))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv  # `train` and `evaluate` relaunch themselves with them under torchrun (their devices)
    if args.log and os.environ.get("RANK", "0") == "0":  # under torchrun, one log: the main rank's
        # a command that takes a run lock appends to the log until it holds the lock (then it is a fresh file), so a
        # second process refused by the lock leaves the first one's log whole
        tee_to(args.log, claim=args.cmd not in LOCKING)
    try:
        args.fn(args, Params.load(args.params))
    except UserError as e:
        error(str(e))
        return 2
    except KeyboardInterrupt:
        interrupted()
        return 130
    except Preempted as e:  # a checkpoint is written and the line saying so printed: a failure to resubmit
        return e.exit_code
    except Exception:
        if not crashed(traceback.format_exc()):  # a rank of the launcher hands it over (launcher.py)
            raise
        return 1
    return 0


def entry() -> None:
    """The `advtrain` command (and `python -m advtrain`): main(), then out without the interpreter's finalization.
    Tearing down the modules of torch, torch._dynamo and MLflow takes 1-2 s per process here (docs/benchmarks.md),
    and a finished command needs none of it: its files are written and closed, its threads done. The streams and the
    logging handlers are flushed first; an exception still leaves the usual way, with its traceback."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()

"""`advtrain`: one command, one sub-command per pipeline stage. Snakemake and DVC both call exactly these.

  advtrain prepare DATASET            -> data/prepared/DATASET/{train.pt,test.pt,meta.json}
  advtrain pretrain METHOD DATASET    -> models/teachers/METHOD_DATASET.pt (a teacher-based method's teacher)
  advtrain train METHOD DATASET       -> models/METHOD_DATASET.pt, metrics/train/METHOD_DATASET.json
  advtrain evaluate METHOD DATASET    -> results/METHOD_DATASET.json
  advtrain report                     -> reports/report.html, reports/report.md
  advtrain sync METHOD DATASET        log a run's local records to MLflow (if the store was unreachable)
  advtrain check                      validate params.yaml and list the configured runs

Paths are relative to the project root (src/advtrain/paths.py); every setting comes from params.yaml.
"""
from __future__ import annotations

import argparse
import sys

from .commands import check, evaluate, prepare, report, sync, train
from .config import Params
from .console import tee_to
from .errors import UserError


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
        p.add_argument("method")
        p.add_argument("dataset")
        p.add_argument("--restart", action="store_true", help="ignore a saved training state and start afresh")
        p.set_defaults(fn=lambda a, params, fn=fn: fn(params, a.method, a.dataset, a.restart))
    p = sub.add_parser("evaluate", help="clean, PGD, CW and AutoAttack accuracy of a trained model")
    p.add_argument("method")
    p.add_argument("dataset")
    p.set_defaults(fn=lambda a, params: evaluate.run(params, a.method, a.dataset))
    p = sub.add_parser("sync", help="log a run's local records to MLflow (after the store was unreachable)")
    p.add_argument("method")
    p.add_argument("dataset")
    p.set_defaults(fn=lambda a, params: sync.run(params, a.method, a.dataset))
    p = sub.add_parser("report", help="HTML + Markdown report over every configured run")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.set_defaults(fn=lambda a, params: report.run(params, a.out))
    p = sub.add_parser("check", help="validate params.yaml")
    p.add_argument("--out", metavar="FILE", help="once valid, write a marker file (dvc.yaml's check stage)")
    p.set_defaults(fn=lambda a, params: check.run(params, a.out))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.log:
        tee_to(args.log)
    try:
        args.fn(args, Params.load(args.params))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

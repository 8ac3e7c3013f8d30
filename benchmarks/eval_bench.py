"""Where an evaluation's time goes: AutoAttack's stages on a trained model under the settings that could change its
cost — the attacked model's memory layout, the batch size, the threads — and what AutoAttack spends per call outside
its attacks (its checks on the defence and its own clean pass). Prints figures; asserts nothing.

    python benchmarks/eval_bench.py --project DIR [--method pgd] [--dataset fashionmnist] [--points 300]
                                    [--autoattack fast] [--variants base,nchw,batch100,threads2] [--out FILE]

DIR is a project whose workflow has run (`make demo` leaves one): its model file models/METHOD_DATASET_seed0.pt
and its prepared test split are used. Each variant runs in a fresh process (the thread count is fixed per process),
through the evaluation the workflow runs (`advtrain.evaluate.evaluate`, PGD and CW off), so the figures are those of
`advtrain evaluate`'s AutoAttack stages. Besides the seconds of each stage, a variant shows whether its per-point
outcomes equal the base variant's: a layout or thread change must not change them; a batch size changes which
random starts each point gets (AutoAttack draws them per batch), so it may."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (channels_last, batch size (0 = every point in one batch), threads)
    "base": (True, 0, 1),
    "nchw": (False, 0, 1),
    "batch100": (True, 100, 1),
    "threads2": (True, 0, 2),
}


def one(a: argparse.Namespace, variant: str) -> dict:
    """Runs in the variant's own process."""
    channels_last, batch, threads = VARIANTS[variant]
    import torch

    torch.set_num_threads(threads)
    from advtrain import evaluate as E
    from advtrain.checkpoint import load_classifier
    from advtrain.config import Params
    from advtrain.prepared import load_split

    os.chdir(a.project)
    cfg = Params.load("params.yaml").resolve(a.method, a.dataset, 0)
    _, model = load_classifier(Path(f"models/{a.method}_{a.dataset}_seed0.pt"), cfg.info)
    model.use_channels_last(channels_last).eval()
    x, y, _ = load_split(Path(f"data/prepared/{a.dataset}"), "test", a.points)
    ev = {"batch_size": batch or a.points, "pgd_steps": 0, "cw_steps": 0, "pgd_restarts": 1, "pgd_alpha": None,
          "autoattack": a.autoattack}
    t0 = time.perf_counter()
    out = E.evaluate(model, x, y, cfg.eps, ev, 0, torch.device("cpu"), log=lambda s: None, norm=cfg.threat_model)
    total = time.perf_counter() - t0
    # AutoAttack's work outside its attacks, per call: with no attack to run, run_standard_evaluation makes only its
    # checks on the defence (5 + 1 + 1 forward passes) and its clean pass
    aa = E._AutoAttack(model, cfg.eps, 0, torch.device("cpu"), cfg.threat_model, cfg.info["classes"])
    xf = E.as_float(x)
    aa.adversary.attacks_to_run = []
    t1 = time.perf_counter()
    aa.adversary.run_standard_evaluation(xf, y, **{aa.bs_key: ev["batch_size"]})
    overhead = time.perf_counter() - t1
    return {"variant": variant, "channels_last": channels_last, "batch_size": ev["batch_size"], "threads": threads,
            "seconds": out["seconds"], "per_attack": out["autoattack"]["seconds_per_attack"],
            "robust_after": out["autoattack"]["robust_acc_after"], "points": out["points"], "total": total,
            "call_overhead": overhead}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", required=True, help="a project folder whose workflow has run")
    ap.add_argument("--method", default="pgd")
    ap.add_argument("--dataset", default="fashionmnist")
    ap.add_argument("--points", type=int, default=300)
    ap.add_argument("--autoattack", default="fast", choices=["fast", "standard"])
    ap.add_argument("--variants", default="base,nchw,batch100,threads2")
    ap.add_argument("--out", default=None, help="write the figures as JSON (atomically)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a variant, in its own process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a, a.one)))
        return
    rows = []
    for variant in a.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"error: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        argv = [sys.executable, __file__, "--one", variant, "--project", a.project, "--method", a.method,
                "--dataset", a.dataset, "--points", str(a.points), "--autoattack", a.autoattack]
        env = {**os.environ, "OMP_NUM_THREADS": str(VARIANTS[variant][2])}
        p = subprocess.run(argv, capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = rows[0]
    attacks = list(base["per_attack"])
    print(f"{a.method} on {a.dataset}, {a.points} test points, AutoAttack {a.autoattack}; seconds per stage "
          f"(one process per variant; load average {os.getloadavg()[0]:.2f} at the end)")
    head = f"{'variant':10} {'layout':6} {'batch':>5} {'thr':>3} " + " ".join(f"{s:>9}" for s in attacks)
    print(head + f" {'total':>7} {'AA call outside attacks':>23}  outcomes = {base['variant']}'s")
    for r in rows:
        same = r["points"] == base["points"]
        print(f"{r['variant']:10} {'NHWC' if r['channels_last'] else 'NCHW':6} {r['batch_size']:>5} {r['threads']:>3} "
              + " ".join(f"{r['per_attack'][s]:>9.1f}" for s in attacks)
              + f" {r['total']:>7.1f} {r['call_overhead']:>22.2f}s  {'yes' if same else 'no'}")
    if a.out:
        tmp = Path(a.out + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()

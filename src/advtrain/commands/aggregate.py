"""`advtrain aggregate METHOD DATASET`: a (method, dataset) over the seeds of `runs.seeds` -> results/METHOD_DATASET.json
(see summary.py for what it holds), and its headline numbers -> metrics/METHOD_DATASET.json (what DVC shows)."""
from __future__ import annotations

import json

from ..config import Params
from ..console import log
from ..errors import UserError
from ..io import write_json
from ..paths import metrics_path, result_path, seed_result_path
from ..summary import headline, summarise


def run(params: Params, method: str, dataset: str) -> dict:
    params.resolve(method, dataset)
    seeds = params.seeds
    records = []
    for seed in seeds:
        path = seed_result_path(method, dataset, seed)
        if not path.exists():
            raise UserError(f"{path}: missing: evaluate seed {seed} first (`advtrain evaluate {method} {dataset} "
                            f"--seed {seed}`, or `snakemake --cores 2 {result_path(method, dataset)}`)")
        records.append(json.loads(path.read_text()))
    record = summarise(seeds, records, [str(seed_result_path(method, dataset, s)) for s in seeds])
    out = result_path(method, dataset)
    write_json(out, record)
    write_json(metrics_path(method, dataset), headline(record))
    rob = record["seeds"]["summary"]["robust_acc"]
    log(f"[aggregate] {method}_{dataset}: robust {100 * rob['mean']:.2f}% +- {100 * rob['std']:.2f} over "
        f"{len(seeds)} seed(s), 95% interval [{100 * rob['ci95'][0]:.1f}, {100 * rob['ci95'][1]:.1f}] -> {out}")
    return record

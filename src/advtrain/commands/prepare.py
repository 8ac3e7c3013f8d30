"""`advtrain prepare DATASET`: fetch a dataset's source, verify it, and write the prepared format."""
from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..console import log
from ..paths import prepared_dir
from ..prepared import prepare


def run(params: Params, dataset: str, out: str | None = None, raw: str = "data/raw") -> dict:
    out_dir = Path(out) if out else prepared_dir(dataset)
    meta = prepare(params.source(dataset), out_dir, raw)
    log(f"[prepare] {dataset}: {meta['n_train']} train / {meta['n_test']} test images "
        f"{'x'.join(map(str, meta['shape']))} from {meta['source']['how']} -> {out_dir}")
    return meta

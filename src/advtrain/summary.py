"""A (method, dataset) over its seeds: the first seed's evaluation record, every field as `evaluate` wrote it (so a
single seed's is unchanged), plus `seeds`: each seed's accuracies and per-point outcomes, and per accuracy the mean,
the sample standard deviation over seeds, and its 95% interval (stats.seeds_interval: the test points' and the
seeds' variance together; with one seed the Wilson interval of the points). `headline` is the small record DVC
shows as the (method, dataset)'s metrics."""
from __future__ import annotations

from .stats import mean_std, seeds_interval, unpack_bits


def accuracies(record: dict) -> dict[str, float]:
    """The headline accuracies of one evaluation record (those it has)."""
    out = {"clean_acc": record["clean_acc"], "pgd_acc": record.get("pgd", {}).get("acc"),
           "cw_acc": record.get("cw", {}).get("acc"),
           "apgd_ce_t_acc": record.get("autoattack", {}).get("robust_acc_after", {}).get("apgd-t"),
           "autoattack_acc": record.get("autoattack", {}).get("robust_acc"), "robust_acc": record["robust_acc"]}
    return {k: v for k, v in out.items() if v is not None}


def outcomes(record: dict, key: str) -> list[bool] | None:
    """Each test point's outcome behind the accuracy `key` of one evaluation record, when the record holds it."""
    points = record.get("points") or {}
    attacks = points.get("attacks") or {}
    aa = record.get("autoattack", {}).get("attacks") or [None]
    hexed = {"clean_acc": points.get("clean"), "robust_acc": points.get("robust"), "pgd_acc": attacks.get("pgd"),
             "cw_acc": attacks.get("cw"), "apgd_ce_t_acc": attacks.get("apgd-t"),
             "autoattack_acc": attacks.get(aa[-1])}.get(key)
    return None if hexed is None else unpack_bits(hexed, record["n_points"])


def summarise(seeds: list[int], records: list[dict], files: list[str] | None = None) -> dict:
    n = records[0]["n_points"]
    per_seed = {str(s): {**accuracies(r), "n_points": r["n_points"], "points": r.get("points")}
                for s, r in zip(seeds, records)}
    summary = {}
    for key in accuracies(records[0]):
        values = [per_seed[str(s)][key] for s in seeds]
        mean, std = mean_std(values)
        per_point = [outcomes(r, key) for r in records]
        point_means = None
        if all(p is not None and len(p) == n for p in per_point):
            point_means = [sum(col) / len(col) for col in zip(*per_point)]
        summary[key] = {"mean": mean, "std": std, "ci95": list(seeds_interval(values, n, point_means)),
                        "values": values}
    runs = {"passes": [r.get("train", {}).get("passes") for r in records],
            "selected_epochs": [(r.get("selection") or {}).get("epoch") for r in records]}
    return {**records[0], "seeds": {"seeds": seeds, "n_points": n, "per_seed": per_seed, "summary": summary,
                                    **runs, "files": files or []}}


HEADLINE = [("clean_acc", "clean"), ("pgd_acc", "PGD"), ("cw_acc", "CW"), ("autoattack_acc", "AutoAttack"),
            ("robust_acc", "robust")]


def headline(record: dict) -> dict:
    """What `dvc exp show` lists for a (method, dataset), accuracies first: the means over seeds of the clean, PGD,
    CW, AutoAttack and robust (each point's worst case) accuracies, the robust accuracy's 95% interval, the training
    passes (mean over seeds) and the epoch each seed's model file holds (one number when they agree).

    Under the method's name: DVC names a column by its key alone when no other metrics file has that key (else it
    prefixes the file's path), so `pgd.robust` stays a short column beside `fgsm.robust`."""
    return {record["method"]: _headline(record)}


def _headline(record: dict) -> dict:
    s = record["seeds"]
    out = {name: round(s["summary"][key]["mean"], 4) for key, name in HEADLINE if key in s["summary"]}
    out["robust_lo"], out["robust_hi"] = (round(v, 4) for v in s["summary"]["robust_acc"]["ci95"])
    passes = [p for p in s.get("passes", []) if p is not None]
    if passes:
        out["passes"] = round(sum(passes) / len(passes), 1)
    epochs = [e for e in s.get("selected_epochs", []) if e is not None]
    if epochs:
        out["epoch"] = epochs[0] if len(set(epochs)) == 1 else epochs
    return out

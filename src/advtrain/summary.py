"""A (method, dataset) over its seeds: the first seed's evaluation record, every field as `evaluate` wrote it (so a
single seed's is unchanged), plus `seeds`: each seed's accuracies and per-point outcomes, and per accuracy the mean,
the sample standard deviation over seeds, and the 95% Wilson interval of the mean from the number of test points
(the spread a test set of that size gives)."""
from __future__ import annotations

from .stats import mean_std, wilson


def accuracies(record: dict) -> dict[str, float]:
    """The headline accuracies of one evaluation record (those it has)."""
    out = {"clean_acc": record["clean_acc"], "pgd_acc": record.get("pgd", {}).get("acc"),
           "cw_acc": record.get("cw", {}).get("acc"),
           "apgd_ce_t_acc": record.get("autoattack", {}).get("robust_acc_after", {}).get("apgd-t"),
           "autoattack_acc": record.get("autoattack", {}).get("robust_acc"), "robust_acc": record["robust_acc"]}
    return {k: v for k, v in out.items() if v is not None}


def summarise(seeds: list[int], records: list[dict], files: list[str] | None = None) -> dict:
    n = records[0]["n_points"]
    per_seed = {str(s): {**accuracies(r), "n_points": r["n_points"], "points": r.get("points")}
                for s, r in zip(seeds, records)}
    summary = {}
    for key in accuracies(records[0]):
        values = [per_seed[str(s)][key] for s in seeds]
        mean, std = mean_std(values)
        summary[key] = {"mean": mean, "std": std, "ci95": list(wilson(mean, n)), "values": values}
    return {**records[0], "seeds": {"seeds": seeds, "n_points": n, "per_seed": per_seed, "summary": summary,
                                    "files": files or []}}

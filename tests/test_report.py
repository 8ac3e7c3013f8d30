"""The report's comparison on synthetic evaluation records (no training): the attacks every method received, the
sign-flip test with Holm's correction, the intervals over seeds, and the headline numbers DVC shows. Records are
built in the shape `advtrain evaluate` writes, with AutoAttack's standard version for some methods and the fast one
for others, as the demo has them."""
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from advtrain import paths
from advtrain.evaluate import AA_VERSIONS
from advtrain.report import build_report, compare
from advtrain.stats import holm, pack_bits, seeds_interval, sign_flip_test, unpack_bits
from advtrain.summary import headline, summarise


def record(method: str, seed: int, version: str, strength: float, n: int = 500, dataset: str = "fashionmnist",
           rng: np.random.Generator | None = None, attack_bits: bool = True) -> dict:
    """One seed's evaluation record: each attack removes a share of the points still robust, AutoAttack's cascade
    one attack after the other (its robust flags cumulative), robust = the worst case over all of them."""
    rng = rng or np.random.default_rng([zlib.crc32(method.encode()), seed])
    clean = rng.random(n) < 0.85
    pgd = clean & (rng.random(n) < strength)
    cw = clean & (rng.random(n) < strength + 0.02)
    after, mask = {}, clean.copy()
    for attack in AA_VERSIONS[version]:
        mask = mask & (rng.random(n) < {"apgd-ce": strength - 0.02, "apgd-t": 0.97}.get(attack, 0.98))
        after[attack] = mask.copy()
    robust = pgd & cw & mask
    acc = lambda m: int(m.sum()) / n  # noqa: E731
    attacks = {"pgd": pack_bits(pgd.tolist()), "cw": pack_bits(cw.tolist()),
               **{a: pack_bits(m.tolist()) for a, m in after.items()}}
    return {
        "method": method, "dataset": dataset, "seed": seed, "model": "small_cnn", "threat_model": "Linf", "eps": 0.1,
        "n_points": n, "clean_acc": acc(clean),
        "pgd": {"steps": 20, "restarts": 1, "alpha": 0.025, "acc": acc(pgd), "acc_after_restart": [acc(pgd)]},
        "cw": {"steps": 20, "restarts": 1, "alpha": 0.025, "acc": acc(cw), "acc_after_restart": [acc(cw)]},
        "autoattack": {"version": version, "attacks": AA_VERSIONS[version], "package": "pyautoattack 0.2.0",
                       "robust_acc_after": {a: acc(m) for a, m in after.items()},
                       "seconds_per_attack": {a: 1.0 for a in after}, "robust_acc": acc(mask), "warnings": []},
        "robust_acc": acc(robust),
        "points": {"clean": pack_bits(clean.tolist()), "robust": pack_bits(robust.tolist()),
                   **({"attacks": attacks} if attack_bits else {})},
        "train": {"passes": 5531.0, "seconds": 79.4, "epochs": 4}, "selection": {"epoch": 3, "select": "best"},
    }


DEMO = [("standard", "standard", 0.05), ("pgd", "standard", 0.75), ("free", "fast", 0.3), ("deat", "fast", 0.64),
        ("mpgd", "fast", 0.71), ("fgsm", "fast", 0.74), ("trades", "fast", 0.745), ("dynat", "fast", 0.74)]


def write_results(root: Path, methods=DEMO, seeds=(0,), n: int = 500, attack_bits: bool = True) -> list[tuple]:
    """results/METHOD_fashionmnist.json for each method, as `advtrain aggregate` writes them, under root."""
    runs = []
    for method, version, strength in methods:
        records = [record(method, s, version, strength, n, attack_bits=attack_bits) for s in seeds]
        out = root / paths.result_path(method, "fashionmnist")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summarise(list(seeds), records)))
        runs.append((method, "fashionmnist"))
    return runs


def test_methods_are_compared_on_the_attacks_every_one_received(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = write_results(tmp_path, seeds=(0, 1, 2))
    rows = [json.loads(paths.result_path(m, d).read_text()) for m, d in runs]
    result = compare(rows)
    assert result["same_attacks"] and result["shared"] == ["PGD-20", "CW-20", "APGD-CE", "APGD-T"]
    assert result["extra"] == {"standard": ["FAB-T", "Square"], "pgd": ["FAB-T", "Square"]}
    # PGD-AT's shared-attack outcome: its worst case over PGD, CW, and AutoAttack as far as APGD-T, per seed
    pgd = rows[1]
    by_seed = []
    for seed in pgd["seeds"]["per_seed"].values():
        bits = {k: unpack_bits(v, 500) for k, v in seed["points"]["attacks"].items()}
        by_seed.append([p and c and t for p, c, t in zip(bits["pgd"], bits["cw"], bits["apgd-t"])])
    values = [sum(s) / 500 for s in by_seed]
    assert pgd["shared"]["values"] == values
    assert pgd["shared"]["ci95"] == pytest.approx(seeds_interval(values, 500, [sum(c) / 3 for c in zip(*by_seed)]))
    assert pgd["shared"]["mean"] >= pgd["seeds"]["summary"]["robust_acc"]["mean"]  # fewer attacks: never lower
    # every pair, the sign-flip test on those outcomes, Holm over the 28 pairs
    assert len(result["pairs"]) == 28
    fgsm = next(r for r in rows if r["method"] == "fgsm")
    fgsm_seeds = [[p and c and t for p, c, t in zip(*(unpack_bits(s["points"]["attacks"][k], 500)
                                                      for k in ("pgd", "cw", "apgd-t")))]
                  for s in fgsm["seeds"]["per_seed"].values()]
    a, b, p, q = next(x for x in result["pairs"] if x[:2] == ("pgd", "fgsm"))
    assert p == pytest.approx(sign_flip_test(by_seed, fgsm_seeds))
    assert [x[3] for x in result["pairs"]] == pytest.approx(holm([x[2] for x in result["pairs"]]))
    assert [r["method"] for r in result["ranking"]][-1] == "standard"
    # the report says all of it, with the extra column
    build_report(runs, tmp_path / "reports")
    md = (tmp_path / "reports/report.md").read_text()
    assert "| robust (min) % | robust, shared attacks % |" in md
    assert ("Robust accuracy compared on the attacks every method received (PGD-20, CW-20, APGD-CE, APGD-T); "
            "standard and pgd also received FAB-T, Square, which only the robust (min) column includes.") in md
    assert "Holm-corrected over the 28 pairs" in md and "(3 here; with one seed it is McNemar's exact test)" in md
    assert "Welch-Satterthwaite" in md
    assert re.search(r"Significant at the 5% level after Holm: .*pgd > free \(p < 0\.001, Holm < 0\.001\)", md)
    assert re.search(r"Not significant: .*and (fgsm|trades) \(p = 0\.\d{3}, Holm = 1\.000\)", md)


def test_one_attack_set_for_all_needs_no_extra_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = write_results(tmp_path, methods=[("pgd", "fast", 0.75), ("fgsm", "fast", 0.74)])
    rows = [json.loads(paths.result_path(m, d).read_text()) for m, d in runs]
    result = compare(rows)
    assert result["extra"] == {} and result["same_attacks"]
    assert rows[0]["shared"]["values"] == [rows[0]["robust_acc"]]  # the shared attacks are all of them
    build_report(runs, tmp_path / "reports")
    md = (tmp_path / "reports/report.md").read_text()
    assert "shared attacks %" not in md and "(1 here; with one seed it is McNemar's exact test)" in md


def test_records_without_per_attack_outcomes_are_compared_on_their_own_attacks_and_it_is_said(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = write_results(tmp_path, methods=DEMO[:3], attack_bits=False)
    build_report(runs, tmp_path / "reports")
    md = (tmp_path / "reports/report.md").read_text()
    assert ("Robust accuracy compared on each method's own attacks, which differ (standard and pgd: also FAB-T, "
            "Square") in md
    assert "re-evaluate them" in md


def test_the_headline_dvc_shows_is_small_and_accuracies_come_first():
    records = [record("pgd", s, "standard", 0.75) for s in (0, 1)]
    records[1]["selection"] = {"epoch": 4, "select": "best"}
    summary = summarise([0, 1], records)
    shown = headline(summary)["pgd"]
    assert list(shown) == ["clean", "PGD", "CW", "AutoAttack", "robust", "robust_lo", "robust_hi", "passes", "epoch"]
    s = summary["seeds"]["summary"]["robust_acc"]
    assert shown["robust"] == round(s["mean"], 4) and [shown["robust_lo"], shown["robust_hi"]] == \
        [round(v, 4) for v in s["ci95"]]
    assert shown["epoch"] == [3, 4] and shown["passes"] == 5531.0
    assert headline(summarise([0], records[:1]))["pgd"]["epoch"] == 3

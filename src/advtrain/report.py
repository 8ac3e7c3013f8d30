"""The report: per dataset, a table of every configured run and plots of the training curves and of robust
accuracy against training time. reports/report.html is self-contained (plots embedded as base64 PNG);
reports/report.md links the same plots from reports/figures/."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .io import write_bytes, write_text
from .paths import result_path, train_metrics_path
from .stats import holm, mean_std, seeds_interval, sign_flip_test, unpack_bits

CURVES = [  # (metric key in the per-epoch record, axis label, scale)
    ("loss", "training loss", "linear"),
    ("adv_acc", "adversarial training accuracy", "linear"),
    ("clean_acc", "clean training accuracy", "linear"),
    ("grad_l1", "input-gradient magnitude (L1, summed over the epoch)", "log"),
    ("attack_steps", "attack steps / replays per batch", "linear"),
    ("seconds", "seconds per epoch", "linear"),
    ("val_clean_acc", "validation clean accuracy (held-out training images)", "linear"),
    ("val_pgd_acc", "validation robust accuracy (PGD; * = the epoch the model file holds)", "linear"),
]
ACCURACY_COLUMNS = [("clean_acc", "clean %"), ("pgd_acc", "PGD %"), ("cw_acc", "CW %"), ("apgd_ce_t_acc", "APGD-CE+T %")]


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _load_runs(runs: list[tuple[str, str]], extra: list[Path] = ()) -> list[dict]:
    """The (method, dataset) results over their seeds, each with the per-epoch curves of its first seed; then the
    `extra` result files (models trained elsewhere, without curves)."""
    out = []
    for method, dataset in runs:
        res = json.loads(result_path(method, dataset).read_text())
        mpath = train_metrics_path(method, dataset, res["seeds"]["seeds"][0])
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        res["curves"] = metrics.get("epochs", [])
        if "seconds" in metrics.get("totals", {}):  # wall-clock time is the metrics file's, not the model file's
            res["train"] = {**res.get("train", {}), "seconds": metrics["totals"]["seconds"]}
        out.append(res)
    for path in extra:
        out.append({**json.loads(Path(path).read_text()), "curves": []})
    return out


INTERVAL = ("the 95% interval is, with one seed, Wilson's interval from the test points, and with several, the mean "
            "± Student's t times the square root of (the variance between test points of each point's outcome "
            "averaged over the seeds / points + the variance between the seeds' accuracies / seeds), at "
            "Welch-Satterthwaite's degrees of freedom, so that it covers both the choice of test points and the spread "
            "between training runs (with one seed it cannot cover the latter)")


def _stat(r: dict, key: str) -> dict | None:
    return r["seeds"]["summary"].get(key) if key != SHARED else r.get("shared")


def _cell(r: dict, key: str) -> str:
    """An accuracy as mean (± std over seeds, when several) [95% interval]."""
    s = _stat(r, key)
    if s is None:
        return "–"
    return f"{_value(s)} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"


def _value(s: dict) -> str:
    spread = f" ± {100 * s['std']:.2f}" if len(s["values"]) > 1 else ""
    return f"{100 * s['mean']:.2f}{spread}"


def _selected(r: dict) -> str:
    sel = r.get("selection") or {}
    return f"{sel['epoch']} ({sel['select']})" if sel else "–"


SHARED = "shared_robust_acc"  # robust accuracy on the attacks every compared run received (set by `compare`)


def _row(r: dict, shared: bool) -> list[str]:
    aa = r.get("autoattack", {})
    tr = r.get("train", {})
    passes = tr.get("passes")
    return [r["method"], r["model"], str(r["n_points"]), str(len(r["seeds"]["seeds"])),
            *(_cell(r, key) for key, _ in ACCURACY_COLUMNS), aa.get("version", "off"), _cell(r, "autoattack_acc"),
            _cell(r, "robust_acc"), *([_cell(r, SHARED)] if shared else []),
            f"{tr.get('seconds', float('nan')):.0f}", "–" if passes is None else f"{passes:g}",
            str(tr.get("epochs", "–")), _selected(r)]


def _header(shared: bool) -> list[str]:
    return ["method", "model", "points", "seeds", *(h for _, h in ACCURACY_COLUMNS), "AutoAttack", "AutoAttack %",
            "robust (min) %", *(["robust, shared attacks %"] if shared else []), "train s", "passes", "epochs",
            "model of epoch"]


NOTE = ("Accuracies: mean over seeds (± sample std when there are several) and [95% interval]: " + INTERVAL + ". "
        "APGD-CE+T: robust accuracy after AutoAttack's first two attacks, recorded for every run (the like-for-like "
        "column when versions differ); AutoAttack %: after every attack of the version named; robust (min): each "
        "point's worst case over all attacks run, PGD and CW included; robust, shared attacks (when the runs "
        "received different attacks): each point's worst case over the attacks every run received; passes: "
        "forward+backward work in minibatch equivalents; train s: training wall time (first seed); model of epoch: "
        "the epoch whose weights were evaluated (best: by validation on held-out training images).")


def _html_table(rows: list[dict], shared: bool) -> str:
    """The comparison table as HTML: the same information as the Markdown one in fewer, narrower columns (model,
    points and seeds under the method; intervals, AutoAttack's version and the epochs trained on a second line)."""
    e = html.escape

    def acc(r: dict, key: str, note: str = "") -> str:
        s = _stat(r, key)
        if s is None:
            return "<td>–</td>"
        ci = f"[{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"
        return f"<td>{e(_value(s))}<small>{e(ci)}{e(note)}</small></td>"

    head = ["method", *(h for _, h in ACCURACY_COLUMNS), "AutoAttack %", "robust (min) %",
            *(["robust, shared attacks %"] if shared else []), "passes", "train s", "model of epoch"]
    out = ["<table class=results><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        tr, aa = r.get("train", {}), r.get("autoattack", {})
        seeds = len(r["seeds"]["seeds"])
        passes = tr.get("passes")
        sel = r.get("selection") or {}
        out.append(
            f"<tr><td><b>{e(r['method'])}</b><small>{e(r['model'])} · {r['n_points']} points · {seeds} "
            f"seed{'s' if seeds > 1 else ''}</small></td>"
            + "".join(acc(r, key) for key, _ in ACCURACY_COLUMNS)
            + acc(r, "autoattack_acc", f" {aa['version']}" if aa else "") + acc(r, "robust_acc")
            + (acc(r, SHARED) if shared else "")
            + f"<td>{'–' if passes is None else f'{passes:g}'}</td><td>{tr.get('seconds', float('nan')):.0f}</td>"
            + f"<td>{e(str(sel.get('epoch', '–')))}<small>{e(sel.get('select', ''))}, of "
              f"{e(str(tr.get('epochs', '–')))} epochs</small></td></tr>")
    return "".join(out) + "</tbody></table>"


def _attacks(r: dict) -> dict[tuple, str]:
    """The attacks an evaluation ran, in order: {identity (with every setting): name}."""
    out = {}
    for family in ("pgd", "cw"):
        if family in r:
            f = r[family]
            restarts = f" x {f['restarts']} restarts" if f["restarts"] > 1 else ""
            out[(family, f["steps"], f["restarts"], f["alpha"])] = f"{family.upper()}-{f['steps']}{restarts}"
    for a in r.get("autoattack", {}).get("attacks", []):
        out[("aa", a)] = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}.get(a, a)
    return out


def _shared_outcomes(r: dict, shared: list[tuple]) -> list[list[bool]] | None:
    """Per seed, each test point's outcome under the attacks `shared` (its worst case over them), or None when the
    records do not hold the per-attack outcomes that needs."""
    mine = list(_attacks(r))
    out = []
    for seed in r["seeds"]["per_seed"].values():
        points, n = seed.get("points") or {}, seed["n_points"]
        if set(shared) == set(mine) and points.get("robust"):
            out.append(unpack_bits(points["robust"], n))
            continue
        attacks = points.get("attacks") or {}
        last_aa = [key[1] for key in shared if key[0] == "aa"][-1:]  # AutoAttack's bits are cumulative
        parts = [attacks.get(key[0]) for key in shared if key[0] != "aa"] + [attacks.get(a) for a in last_aa]
        if not shared or any(p is None for p in parts):
            return None
        flags = [unpack_bits(p, n) for p in parts]
        out.append([all(f) for f in zip(*flags)])
    return out


def compare(rows: list[dict]) -> dict:
    """The comparison of robust accuracy between the methods of one dataset, on the attacks every one of them
    received (AutoAttack's longest common prefix of attacks, PGD and CW where their settings agree): per method its
    accuracy there (mean, std, 95% interval; stored in the row as `shared`), and per pair the exact sign-flip test
    over the test points of each point's outcome averaged over the method's seeds, with Holm's correction over the
    pairs. When some record lacks the per-attack outcomes, each method's own worst case is compared instead and
    `same_attacks` says False."""
    lists = [list(_attacks(r)) for r in rows]
    shared = [key for key in lists[0] if key[0] != "aa" and all(key in other for other in lists)]
    cascades = [[k for k in keys if k[0] == "aa"] for keys in lists]
    for i, key in enumerate(cascades[0]):
        if any(len(other) <= i or other[i] != key for other in cascades):
            break
        shared.append(key)
    names = _attacks(rows[0])
    extra = {r["method"]: [name for key, name in _attacks(r).items() if key not in shared] for r in rows}
    outcomes = {r["method"]: _shared_outcomes(r, shared) for r in rows}
    same = all(o is not None for o in outcomes.values())
    if not same:  # the records say only each run's own worst case
        outcomes = {r["method"]: [unpack_bits(s["points"]["robust"], s["n_points"])
                                  for s in r["seeds"]["per_seed"].values() if (s.get("points") or {}).get("robust")]
                    for r in rows}
    for r in rows:
        o = outcomes[r["method"]]
        if o:
            values = [sum(s) / len(s) for s in o]
            mean, std = mean_std(values)
            point_means = [sum(col) / len(col) for col in zip(*o)]
            r["shared"] = {"mean": mean, "std": std, "values": values,
                           "ci95": list(seeds_interval(values, len(o[0]), point_means))}
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            oa, ob = outcomes[a["method"]], outcomes[b["method"]]
            if oa and ob and len(oa[0]) == len(ob[0]):
                pairs.append([a["method"], b["method"], sign_flip_test(oa, ob)])
    for pair, adjusted in zip(pairs, holm([p for _, _, p in pairs])):
        pair.append(adjusted)
    return {"shared": [names.get(k, str(k)) for k in shared], "extra": {m: e for m, e in extra.items() if e},
            "same_attacks": same, "pairs": [tuple(p) for p in pairs],
            "ranking": sorted((r for r in rows if r.get("shared")), key=lambda r: -r["shared"]["mean"])}


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def comparison_text(rows: list[dict], result: dict, alpha: float = 0.05) -> str:
    """The comparison in words: which attacks, which test, the ranking, and which differences hold after Holm."""
    extra: dict[str, list[str]] = {}  # the same extra attacks, the methods that received them
    for method, attacks in result["extra"].items():
        extra.setdefault(", ".join(attacks), []).append(method)
    if result["same_attacks"]:
        on = f"on the attacks every method received ({', '.join(result['shared']) or 'none'})"
        on += "".join(f"; {' and '.join(ms)} also received {a}, which only the robust (min) column includes"
                      for a, ms in extra.items())
    else:
        on = ("on each method's own attacks, which differ (" + "; ".join(f"{' and '.join(ms)}: also {a}"
                                                                         for a, ms in extra.items())
              + "): the records lack the per-attack outcomes a comparison on the shared attacks needs "
              "(re-evaluate them to get it)")
    n = rows[0]["n_points"]
    seeds = sorted({len(r["seeds"]["seeds"]) for r in rows})
    rank = {r["method"]: i for i, r in enumerate(result["ranking"])}
    ranking = ", ".join(f"{r['method']} {_value(r['shared'])}" for r in result["ranking"])
    held, not_held = [], []  # each pair in ranking order, the better first
    ordered = sorted(((*sorted(pair[:2], key=lambda m: rank.get(m, 0)), *pair[2:]) for pair in result["pairs"]),
                     key=lambda x: (rank.get(x[0], 0), rank.get(x[1], 0)))
    for a, b, p, q in ordered:
        (held if q < alpha else not_held).append(f"{a} {'>' if q < alpha else 'and'} {b} (p {_p(p)}, Holm {_p(q)})")
    return (f"Robust accuracy compared {on}. Ranking (mean over seeds, %): {ranking}. Test: the exact sign-flip "
            f"(paired permutation) test over the {n} test points of each point's outcome averaged over each "
            f"method's seeds ({' or '.join(map(str, seeds))} here; with one seed it is McNemar's exact test), "
            f"Holm-corrected over the {len(result['pairs'])} pairs; it takes the trained models as given, and the "
            f"spread between training runs is in the intervals. Significant at the {100 * alpha:.0f}% level after "
            "Holm: " + ("; ".join(held) if held else "none") + ". Not significant: "
            + ("; ".join(not_held) if not_held else "none") + ".")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both time (lower) and accuracy (higher)."""
    return [i for i, (t, a) in enumerate(points)
            if not any((t2 <= t and a2 >= a) and (t2 < t or a2 > a) for t2, a2 in points)]


def _figures(dataset: str, rows: list[dict]):
    """Yield (name, title, PNG bytes) for one dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    from matplotlib.ticker import MaxNLocator

    color = {r["method"]: f"C{i}" for i, r in enumerate(rows)}  # one colour per method in every panel
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5), layout="constrained")
    for ax, (key, label, scale) in zip(axes.flat, CURVES):
        for r in rows:
            pts = [(c["epoch"], c[key]) for c in r["curves"] if c.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=r["method"], color=color[r["method"]])
            chosen = (r.get("selection") or {}).get("epoch")
            if key == "val_pgd_acc" and chosen and any(e == chosen for e, _ in pts):
                ax.plot(chosen, dict(pts)[chosen], marker="*", ms=14, color=color[r["method"]], ls="none")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if scale == "log" and any(c.get(key) for r in rows for c in r["curves"]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right upper", fontsize=9)
    fig.suptitle(f"{dataset}: per-epoch training curves")
    yield f"{dataset}_curves", f"{dataset}: per-epoch training curves", png(fig)

    driven = [r for r in rows if len({c.get("attack_steps") for c in r["curves"]}) > 1]
    if driven:  # DEAT's idea: the count grows when the gradient magnitude passes its threshold
        fig, axes = plt.subplots(1, len(driven), figsize=(5.2 * len(driven), 3.8), layout="constrained", squeeze=False)
        for ax, r in zip(axes[0], driven):
            ep = [c["epoch"] for c in r["curves"]]
            ax.plot(ep, [c["grad_l1"] for c in r["curves"]], marker="o", ms=3, color=color[r["method"]])
            ax.set_ylabel("gradient magnitude G (L1)", color=color[r["method"]])
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            twin = ax.twinx()
            twin.step(ep, [c["attack_steps"] for c in r["curves"]], where="mid", color="k", alpha=0.7)
            twin.set_ylabel("replays / attack steps in use")
            twin.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(r["method"])
        fig.suptitle(f"{dataset}: gradient magnitude and the iteration count it drives")
        yield f"{dataset}_magnitude", f"{dataset}: gradient magnitude and replay/step count per epoch", png(fig)

    labelled = [r for r in rows if any("label_agreement" in c for c in r["curves"])]
    for r in labelled:  # dynamic labels, "weak to strong": a teacher's labels grow more accurate as it learns
        fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
        ep = [c["epoch"] for c in r["curves"]]
        ax.plot(ep, [100 * c["label_agreement"] for c in r["curves"]], marker="o", ms=3,
                label="dynamic labels = ground truth (training batches)")
        if all("teacher_acc" in c for c in r["curves"]):
            ax.plot(ep, [100 * c["teacher_acc"] for c in r["curves"]], marker="s", ms=3,
                    label="teacher's clean accuracy (held-out images)")
        ax.plot(ep, [100 * c["adv_acc"] for c in r["curves"]], marker="^", ms=3, label="student's adversarial training accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{dataset}: {r['method']}, weak-to-strong dynamic labels")
        yield f"{dataset}_{r['method']}_labels", f"{dataset}: {r['method']} label agreement per epoch", png(fig)

    staged = [r for r in rows if r.get("autoattack")]
    if staged:  # AutoAttack's cascade: robust accuracy after each stage (never rises)
        fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
        longest = max((r["autoattack"]["attacks"] for r in staged), key=len)
        for r in staged:
            aa = r["autoattack"]
            ys = [100 * r["clean_acc"]] + [100 * aa["robust_acc_after"][a] for a in aa["attacks"]]
            ax.plot(range(len(ys)), ys, marker="o", ms=4, label=f"{r['method']} ({aa['version']})",
                    color=color[r["method"]])
        ax.set_xticks(range(len(longest) + 1), ["clean", *longest])
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset}: robust accuracy after each AutoAttack stage")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        yield f"{dataset}_autoattack_stages", f"{dataset}: robust accuracy after each AutoAttack stage", png(fig)

    shown = [r for r in rows if r.get("examples")]
    if shown:
        yield (f"{dataset}_examples", f"{dataset}: clean and adversarial test images with each model's predictions",
               png(_example_grid(plt, shown)))

    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    # robust accuracy on the attacks every method received (compare()), so that the points are comparable
    robust = lambda r: r.get("shared") or r["seeds"]["summary"]["robust_acc"]  # noqa: E731
    pts = [(r.get("train", {}).get("seconds", 0), 100 * robust(r)["mean"]) for r in rows]
    front = sorted((pts[i] for i in pareto(pts)))
    if len(front) > 1:
        ax.plot(*zip(*front), ls="--", color="grey", lw=1, label="Pareto front")
        ax.legend(fontsize=8, loc="lower right")
    for r, (t, a) in zip(rows, pts):
        ax.scatter(t, a, s=40, color=color[r["method"]])
        ax.annotate(r["method"], (t, a), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("robust accuracy, shared attacks (%)")
    ax.set_title(f"{dataset}: robustness against training time")
    ax.grid(alpha=0.3)
    yield f"{dataset}_time", f"{dataset}: robust accuracy against training time", png(fig)


def _example_grid(plt, rows: list[dict]):
    """Per method, two rows: the first test images and the worst-case adversarial image found for each, titled
    with the model's prediction (green: correct, red: wrong)."""
    import numpy as np

    k = max(len(r["examples"]["labels"]) for r in rows)
    fig, axes = plt.subplots(2 * len(rows), k, figsize=(1.3 * k, 2.9 * len(rows)), layout="constrained", squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    def name(r: dict, i: int) -> str:
        names = r.get("class_names") or []
        return names[i] if i < len(names) else str(i)

    for m, r in enumerate(rows):
        ex = r["examples"]
        c, h, w = ex["shape"]
        for row, (key, pred_key, what) in enumerate((("clean_u8", "clean_pred", "clean"), ("adv_u8", "adv_pred", "adv"))):
            for j, hexed in enumerate(ex[key]):
                img = np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8).reshape(c, h, w).transpose(1, 2, 0)
                ax = axes[2 * m + row, j]
                ax.imshow(img.squeeze(-1) if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
                ok = ex[pred_key][j] == ex["labels"][j]
                ax.set_title(name(r, ex[pred_key][j]), fontsize=7, color="green" if ok else "red")
            axes[2 * m + row, 0].text(-0.15, 0.5, f"{r['method']}\n{what}", transform=axes[2 * m + row, 0].transAxes,
                                      ha="right", va="center", fontsize=8)
    truth = ", ".join(name(rows[0], y) for y in rows[0]["examples"]["labels"])
    fig.suptitle(f"the first test images (true classes: {truth}); titles: the model's prediction", fontsize=8)
    return fig


def checks(r: dict) -> list[str]:
    """What must hold of any honest evaluation record; the report prints any failure in red."""
    bad = []
    aa = r.get("autoattack")
    if aa:
        stages = [r["clean_acc"], *(aa["robust_acc_after"][a] for a in aa["attacks"])]
        if any(b > a for a, b in zip(stages, stages[1:])):
            bad.append("AutoAttack's breakdown rises between stages")
    for family in ("pgd", "cw"):
        if family in r and r["robust_acc"] > r[family]["acc"] + 1e-12:
            bad.append(f"final robust accuracy above the {family.upper()} one")
    if aa and r["robust_acc"] > aa["robust_acc"] + 1e-12:
        bad.append("final robust accuracy above AutoAttack's")
    return bad


def build_report(runs: list[tuple[str, str]], out_dir: Path, extra: list[Path] = ()) -> tuple[Path, Path]:
    results = _load_runs(runs, extra)
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig_dir = out_dir / "figures"
    # no time stamp: the same results give a byte-identical report (DVC and Snakemake then see nothing changed)
    md = ["# Adversarial training report", "", f"Generated by `advtrain report` from {len(results)} results.", ""]
    body = [f"<h1>Adversarial training report</h1><p class=meta>Generated by <code>advtrain report</code> from "
            f"{len(results)} results.</p>"]
    for ds in datasets:
        rows = [r for r in results if r["dataset"] == ds]
        eps = rows[0]["eps"]
        norm = {"Linf": "L-inf", "L2": "L2"}.get(rows[0].get("threat_model", "Linf"), rows[0].get("threat_model"))
        aa_versions = sorted({r.get("autoattack", {}).get("version", "off") for r in rows})
        threat = (f"Threat model: {norm}, eps = {eps:.4g} (images in [0, 1]); AutoAttack: {' and '.join(aa_versions)} "
                  f"version; "
                  f"PGD: {rows[0].get('pgd', {}).get('steps', '–')} steps x {rows[0].get('pgd', {}).get('restarts', '–')} restarts")
        result = compare(rows)
        shared = bool(result["extra"]) or not result["same_attacks"]  # a column of its own only when it differs
        header = _header(shared)
        md += [f"## {ds}", "", threat, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(_row(r, shared)) + " |" for r in rows]
        md += ["", NOTE]
        body.append(f"<h2>{html.escape(ds)}</h2><p>{html.escape(threat)}</p>{_html_table(rows, shared)}"
                    f"<p class=meta>{html.escape(NOTE)}</p>")
        if result["pairs"]:
            said = comparison_text(rows, result)
            md += ["", said]
            body.append(f"<p class=ranking>{html.escape(said)}</p>")
        failed = {r["method"]: checks(r) for r in rows if checks(r)}
        verdict = ("Checks: every AutoAttack breakdown is monotone and every final robust accuracy is at most its PGD, "
                   "CW and AutoAttack ones." if not failed else
                   "CHECK FAILED: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in failed.items()))
        md += ["", verdict]
        body.append(f"<p class={'ok' if not failed else 'bad'}>{html.escape(verdict)}</p>")
        warned = [(r["method"], w) for r in rows for w in r.get("autoattack", {}).get("warnings", [])]
        if warned:
            md += ["", "AutoAttack's own warnings:", ""] + [f"- {m}: {w}" for m, w in warned]
            body.append("<ul class=warnings>" + "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(w)}</li>"
                                                         for m, w in warned) + "</ul>")
        skipped = [(r["method"], a, why) for r in rows for a, why in r.get("autoattack", {}).get("skipped", {}).items()]
        if skipped:
            md += ["", "AutoAttack attacks not run (not defined for these models):", ""] + [
                f"- {m}: {a} skipped: {why}" for m, a, why in skipped]
            body.append("<p>AutoAttack attacks not run (not defined for these models):</p><ul class=skipped>" + "".join(
                f"<li><b>{html.escape(m)}</b>: {html.escape(a)} skipped: {html.escape(why)}</li>"
                for m, a, why in skipped) + "</ul>")
        breakdown = [r for r in rows if r.get("autoattack")]
        if breakdown:
            md += ["", "Robust accuracy (%) after each AutoAttack stage:", ""]
            for r in breakdown:
                stages = ", ".join(f"{a} {_pct(v)}" for a, v in r["autoattack"]["robust_acc_after"].items())
                md.append(f"- {r['method']}: clean {_pct(r['clean_acc'])} → {stages}")
                body.append(f"<p class=stages><b>{html.escape(r['method'])}</b>: clean {_pct(r['clean_acc'])} → "
                            f"{html.escape(stages)}</p>")
        md.append("")
        for name, title, data in _figures(ds, rows):
            write_bytes(fig_dir / f"{name}.png", data)
            md += [f"![{title}](figures/{name}.png)", ""]
            body.append(f"<figure id=\"fig-{html.escape(name)}\"><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,"
                        f"{base64.b64encode(data).decode()}\"><figcaption>{html.escape(title)}</figcaption></figure>")
    # the table fits a 1,400-px window: every cell on its lines (no wrapping inside a number or an interval), the
    # interval and the details on a smaller second line
    style = ("body{font-family:system-ui,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}"
             "td{white-space:nowrap}th{background:#f3f3f3;font-weight:600}"
             "td:first-child,th:first-child{text-align:left}"
             "td small{display:block;color:#666;font-size:85%}img{max-width:100%}"
             "figure{margin:1.5em 0}figcaption{color:#666;font-size:90%}.meta{color:#666}.ok{color:#176317}"
             ".bad{color:#b00;font-weight:bold}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>Adversarial training report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text(html_path, page)
    write_text(md_path, "\n".join(md) + "\n")
    return html_path, md_path

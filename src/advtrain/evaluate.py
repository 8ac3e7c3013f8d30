"""Robustness evaluation: clean accuracy, PGD-k and CW-k with restarts, and AutoAttack with a per-attack breakdown.

Every attack is a *stage* that attacks, batch by batch, the points still robust in its family:
  pgd   PGD-k on the cross-entropy, one stage per restart (each point's worst case over the restarts)
  cw    CW-k: the same PGD on the margin loss (Carlini & Wagner's), one stage per restart
  aa    AutoAttack's cascade (APGD-CE, APGD-T, FAB-T, Square; or APGD-CE, APGD-T for "fast"), from the clean-correct
        points, exactly as `run_standard_evaluation` runs it, so its numbers are AutoAttack's own
The final robust accuracy is the per-point minimum over every attack run.

AutoAttack comes from the `pyautoattack` package (or the official `autoattack` module when that is installed). We
call it once per attack and batch, which is what its own loop does inside (it reseeds every attack per batch), so the
result is the same as one call, and the robust flags after every batch are ours to keep.

Resumable: after every batch the state (robust flags per family, stages done, the batch reached) is saved atomically
to a state file, keyed by the model file's sha256 and the evaluation settings; a killed evaluation rerun with the same
command continues from the last saved batch and ends with the same result. (pyautoattack 0.2.0's own
`state_path` restore fails with an UnboundLocalError on `y_adv` and writes its JSON in place, so we keep the
equivalent state ourselves.)

Across ranks (`evaluation.devices`, under torchrun): each stage's points still robust are cut into the batches one
process makes, and batch i goes to rank i % ranks, which attacks it exactly as one process does. Once every rank has
attacked its batches, the ranks merge their outcomes (a point stays robust only if no rank fooled it), so the next
stage starts from the same points as in one process, and the result is one process's. Each rank saves its own state
after each of its batches (its own file, holding the number of ranks: a state of another split is not resumed), and a
stage counts as done only after the merge: a rank killed mid-stage, rerun with the same command, attacks its
remaining batches while the others, already done with theirs, wait at the merge."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import faults
from .attacks import as_float, pgd, predict
from .distributed import World
from .io import save_torch
from .lazy import torch
from .stats import pack_bits

AA_VERSIONS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"], "fast": ["apgd-ce", "apgd-t"]}
N_EXAMPLES = 8  # test points whose clean and adversarial images the report shows


def _autoattack_module():
    """(module, name, keyword of the batch size): pyautoattack says batch_size=, the official module bs=."""
    try:
        import pyautoattack as aa

        return aa, "pyautoattack " + getattr(aa, "__version__", "?"), "batch_size"
    except ImportError:
        import autoattack as aa  # the official repository's module

        return aa, "autoattack (official)", "bs"


class _Collect(logging.Handler):
    """Collects AutoAttack's own warnings (its checks on the defence)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.append(record.getMessage().strip())


@dataclass
class Stage:
    name: str     # "pgd-20 #1", "cw-20 #1", "apgd-ce", ...
    family: str   # pgd | cw | aa
    attack: str   # ce | margin | an AutoAttack attack name


def plan(ev: dict) -> list[Stage]:
    stages = []
    for family, loss, steps in (("pgd", "ce", ev["pgd_steps"]), ("cw", "margin", ev["cw_steps"])):
        if steps:
            stages += [Stage(f"{family}-{steps} #{r + 1}", family, loss) for r in range(ev["pgd_restarts"])]
    if ev["autoattack"] != "off":
        stages += [Stage(a, "aa", a) for a in AA_VERSIONS[ev["autoattack"]]]
    return stages


class _AutoAttack:
    """One AutoAttack attack on one batch, through the package's own entry point."""

    def __init__(self, model, eps: float, seed: int, device: torch.device, norm: str = "Linf", classes: int = 10):
        self.module, self.package, self.bs_key = _autoattack_module()
        self.adversary = self.module.AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed,
                                                device=device)
        # the standard version targets the 9 runner-up classes; with fewer classes there are only classes - 1
        # (AutoAttack itself then indexes past the logits)
        targets = min(9, classes - 1)
        self.adversary.apgd_targeted.n_target_classes = targets
        self.adversary.fab.n_target_classes = targets
        self.logger = logging.getLogger("auto-attack")
        self.collect = _Collect()

    def __call__(self, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.adversary.attacks_to_run = [attack]
        self.logger.addHandler(self.collect)
        old = self.logger.level
        self.logger.setLevel(logging.WARNING)  # its per-batch lines are ours to print
        try:
            out = self.adversary.run_standard_evaluation(x, y, **{self.bs_key: len(y)})
        finally:
            self.logger.removeHandler(self.collect)
            self.logger.setLevel(old)
        return (out[0] if isinstance(out, tuple) else out).to(x.device)  # pyautoattack: (x_adv, y_adv)


def undefined(attack: str, classes: int) -> str | None:
    """Why an AutoAttack attack is not defined for a classifier with `classes` outputs, or None when it is.

    APGD-T's targeted DLR loss is (z_y - z_t) / (z_max - (z_3rd + z_4th) / 2): it reads the 4th largest logit, so it
    needs 4 classes (AutoAttack itself then raises an IndexError). FAB-T and Square are defined from 2 classes (FAB-T
    targets the classes - 1 runner-up classes); APGD-CE everywhere."""
    if attack == "apgd-t" and classes < 4:
        return (f"its targeted DLR loss needs the 3rd and 4th largest logits, so at least 4 classes; this model has "
                f"{classes}")
    return None


def fingerprint(model_file: Path, eps: float, ev: dict, seed: int, n: int, norm: str = "Linf") -> str:
    h = hashlib.sha256(Path(model_file).read_bytes())
    # where and on how many ranks it runs changes no number of the result
    settings = {"eps": eps, "ev": {k: v for k, v in ev.items() if k not in ("device", "devices")}, "seed": seed,
                "n": n}
    if norm != "Linf":  # (so that L-inf keys stay what they were)
        settings["norm"] = norm
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def load_state(path: Path, key: str, log: Callable[[str], None], world_size: int = 1) -> dict | None:
    """The saved evaluation state if it belongs to this model, these settings and this number of ranks (else None:
    start afresh)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a state file is a cache: an unreadable one only costs the time to recompute
        log(f"[evaluate] warning: {path} is unreadable ({type(e).__name__}); evaluating afresh")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log(f"[evaluate] {path} is from another model or other settings; evaluating afresh")
        return None
    saved = state.get("world", 1)
    if saved != world_size:  # its batches were another split of the stages' points
        log(f"[evaluate] {path} was saved by an evaluation on {saved} rank(s), this one runs on {world_size}; "
            "evaluating afresh")
        return None
    return state


# What every rank holds alike once a stage's outcomes are merged; the rest of a rank's state is its own (its place
# in the current stage, its batch count, which example images its batches replaced since the last merge)
SHARED = ("masks", "done", "after", "aa_masks", "skipped", "seconds", "warnings", "ex_adv", "ex_fooled")


def _agree(world: World, state: dict | None, stages: list[Stage], log: Callable[[str], None]) -> dict | None:
    """The ranks' saved states, made one evaluation's: all resume or all start afresh, at the same stage.

    A rank may be one stage behind the others: it was killed after a stage's merge and before it saved the stage as
    done, while they saved it (and may have attacked batches of the next stage since). Every rank had attacked all of
    its batches of that stage before the merge, so an ahead rank's merged outcome is the stage's: the rank behind
    takes it, and starts its batches of the next stage from that stage's points (its todo, which the ahead ranks
    keep)."""
    views = world.gather_objects(None if state is None else len(state["done"]))
    if None in views:
        if any(v is not None for v in views) and world.main:
            missing = ", ".join(str(r) for r, v in enumerate(views) if v is None)
            log(f"[evaluate] rank(s) {missing} of {world.size} have no saved state of this evaluation; every rank "
                "evaluates afresh")
        return None
    if min(views) == max(views):
        return state
    ahead = views.index(max(views))
    shared = world.gather_objects({**{k: state[k] for k in SHARED if k in state}, "current": state["current"]}
                                  if world.rank == ahead else None)[ahead]
    if views[world.rank] < views[ahead]:
        cur = shared.pop("current")
        log(f"[evaluate] the other ranks saved {shared['done'][-1]} as merged after this rank was stopped: taking "
            "their outcome")
        state.update(shared)
        state["current"] = None
        if cur:  # the ahead ranks' mask of this stage holds their own batches' outcomes: back to its points
            family = next(s.family for s in stages if s.name == cur["stage"])
            start = torch.zeros_like(state["clean"])
            start[cur["todo"]] = True
            state["masks"][family] = start
            state["current"] = {"stage": cur["stage"], "todo": cur["todo"], "next": 0}
        state["ex_touched"] = torch.zeros_like(state["ex_fooled"])
    return state


def _merge(world: World, state: dict, stage: Stage, mask: torch.Tensor, warnings: list[str]) -> torch.Tensor:
    """A stage's outcomes over the ranks, once each has attacked its batches: a point stays robust only if no rank
    fooled it (a rank leaves the points of other ranks' batches as they were), the example images the stage replaced
    come from the rank that attacked them, the stage took as long as its slowest rank, and AutoAttack's warnings are
    every rank's."""
    touched = state["ex_touched"].nonzero().squeeze(1).tolist()
    parts = world.gather_objects({
        "mask": mask.cpu(), "seconds": state["seconds"].get(stage.name, 0.0), "warnings": warnings,
        "examples": {i: (state["ex_adv"][i], bool(state["ex_fooled"][i])) for i in touched}})
    merged = torch.stack([p["mask"] for p in parts]).all(0)
    state["seconds"][stage.name] = max(p["seconds"] for p in parts)
    state["warnings"] = sorted(set().union(*(p["warnings"] for p in parts)))
    for p in parts:
        for i, (adv, fooled) in p["examples"].items():
            state["ex_adv"][i], state["ex_fooled"][i] = adv, fooled
    state["ex_touched"].zero_()
    return merged.to(mask.device)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, ev: dict, seed: int,
             device: torch.device, log: Callable[[str], None] = print, state_path: Path | None = None,
             key: str = "", norm: str = "Linf", world: World | None = None) -> dict:
    """x: the points, as uint8 pixels (kept so on the device, made float a batch at a time: a quarter of float32's
    memory) or float [0, 1] images; the same numbers either way.

    world: the ranks of `evaluation.devices` (distributed.py), started; each attacks its share of every stage's
    batches and saves its own state at `state_path`. Every rank returns the result; `log` gets this rank's lines
    (its resume, its batches), and the main rank's alone say what holds for all (accuracies)."""
    model.eval().to(device)
    x, y = x.to(device), y.to(device)
    n, bs = len(y), ev["batch_size"]
    alpha = ev["pgd_alpha"] or eps / 4
    stages = plan(ev)
    size, rank = (world.size, world.rank) if world is not None else (1, 0)
    say = log if rank == 0 else (lambda msg: None)

    def save():
        if state_path:
            save_torch(state_path, state)

    state = load_state(state_path, key, log, size) if state_path else None
    if size > 1:
        state = _agree(world, state, stages, log)
    if state is None:
        t0 = time.perf_counter()
        clean = predict(model, x, bs) == y
        state = {"key": key, "world": size, "clean": clean.cpu(),
                 "masks": {f: clean.cpu().clone() for f in ("pgd", "cw", "aa")},
                 "done": [], "after": {}, "seconds": {"clean": time.perf_counter() - t0}, "current": None,
                 "batches": 0, "warnings": [],
                 "ex_adv": as_float(x[:N_EXAMPLES]).cpu().clone(),
                 "ex_fooled": torch.zeros(min(n, N_EXAMPLES), dtype=torch.bool)}
        if size > 1:  # a rank killed before its first batch still has a state to resume: the others keep theirs
            save()
    else:
        done_batches = state["batches"]
        log(f"[evaluate] resuming from {state_path}: {len(state['done'])}/{len(stages)} attacks and "
            f"{done_batches} batches already done")
    # the first points whose adversarial images this rank replaced since the last merge
    state.setdefault("ex_touched", torch.zeros_like(state["ex_fooled"]))
    clean = state["clean"].to(device)
    acc = lambda mask: mask.sum().item() / n  # noqa: E731  (exact fractions of n, as AutoAttack reports them)
    say(f"[evaluate] clean accuracy {100 * acc(clean):.2f}% on {n} points")

    aa = classes = None
    skipped = state.setdefault("skipped", {})  # AutoAttack attacks not defined for this model: {attack: why}
    for si, stage in enumerate(stages):
        if stage.name in state["done"]:
            continue
        if stage.family == "aa":
            if classes is None:
                with torch.no_grad():
                    classes = model(as_float(x[:1])).shape[1]
            why = undefined(stage.attack, classes)
            if why:  # recorded as done: a resumed evaluation goes past it as well
                skipped[stage.name] = why
                state["done"].append(stage.name)
                state["current"] = None
                save()
                say(f"[evaluate] {stage.name} skipped: {why}")
                continue
        mask = state["masks"][stage.family].to(device)
        cur = state["current"]
        if cur and cur["stage"] == stage.name:
            todo, first = cur["todo"].to(device), cur["next"]
        else:
            todo, first = mask.nonzero().squeeze(1), 0
        if stage.family == "aa" and aa is None:
            aa = _AutoAttack(model, eps, seed, device, norm, classes)
        n_batches = (len(todo) + bs - 1) // bs
        t0 = time.perf_counter()
        # the batches one process makes, batch i attacked by rank i % size: each batch is attacked as one process
        # attacks it (PGD and CW seeded per stage and batch, AutoAttack reseeding itself every call)
        for bi in range(first, n_batches):
            if bi % size != rank:
                continue
            b = todo[bi * bs:(bi + 1) * bs]
            if stage.family == "aa":
                x_adv = aa(stage.attack, as_float(x[b]), y[b])
            else:  # seeded per (stage, batch), so a resumed evaluation draws the same random starts
                torch.manual_seed(seed * 1_000_003 + si * 10_007 + bi)
                steps = ev["pgd_steps"] if stage.family == "pgd" else ev["cw_steps"]
                x_adv = pgd(model, as_float(x[b]), y[b], eps, alpha, steps, loss=stage.attack, norm=norm)
            fooled = predict(model, x_adv, bs) != y[b]
            mask[b[fooled]] = False
            shown = b < N_EXAMPLES  # keep an adversarial image for the report's grid: the one that fooled, if any
            for j in shown.nonzero().squeeze(1).tolist():
                i = b[j].item()
                if not state["ex_fooled"][i]:
                    state["ex_adv"][i] = x_adv[j].cpu()
                    state["ex_fooled"][i] = bool(fooled[j])
                    state["ex_touched"][i] = True
            state["masks"][stage.family] = mask.cpu()
            state["current"] = {"stage": stage.name, "todo": todo.cpu(), "next": bi + 1}
            state["batches"] += 1
            state["seconds"][stage.name] = state["seconds"].get(stage.name, 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            save()
            if n_batches > 1:  # a rank's mask holds only its own batches' outcomes until the merge
                robust = f", robust {100 * acc(mask):.2f}%" if size == 1 else ""
                log(f"[evaluate] {stage.name}: batch {bi + 1}/{n_batches}{robust}")
            faults.fires("evaluate.batch", f"{stage.name} {bi + 1}/{n_batches}")
        warnings = sorted(set(state["warnings"]) | set(aa.collect.warnings)) if aa is not None else state["warnings"]
        if size > 1:  # the next stage's points are the ones every rank left robust
            mask = _merge(world, state, stage, mask, warnings)
            state["masks"][stage.family] = mask.cpu()
        else:
            state["warnings"] = warnings
        state["done"].append(stage.name)
        state["after"][stage.name] = acc(mask)
        if stage.family == "aa":  # who is still robust after each attack of the cascade: the attacks two runs share
            state.setdefault("aa_masks", {})[stage.name] = mask.cpu().clone()
        state["current"] = None
        save()
        say(f"[evaluate] robust accuracy after {stage.name}: {100 * state['after'][stage.name]:.2f}% "
            f"({state['seconds'].get(stage.name, 0.0):.1f}s)")

    masks = {f: m.to(device) for f, m in state["masks"].items()}
    families = {s.family for s in stages}
    robust = clean.clone()
    for f in families:
        robust &= masks[f]
    out: dict = {"n_points": n, "clean_acc": acc(clean)}
    for family, steps in (("pgd", ev["pgd_steps"]), ("cw", ev["cw_steps"])):
        if family in families:
            out[family] = {"steps": steps, "restarts": ev["pgd_restarts"], "alpha": alpha, "acc": acc(masks[family]),
                           "acc_after_restart": [state["after"][s.name] for s in stages if s.family == family]}
    if "aa" in families:
        attacks = [a for a in AA_VERSIONS[ev["autoattack"]] if a not in skipped]
        out["autoattack"] = {
            "version": ev["autoattack"], "attacks": attacks, "skipped": dict(skipped),
            "package": _autoattack_module()[1],
            "robust_acc_after": {a: state["after"][a] for a in attacks},
            "seconds_per_attack": {a: state["seconds"].get(a, 0.0) for a in attacks},
            "robust_acc": acc(masks["aa"]), "warnings": state["warnings"]}
    out["robust_acc"] = acc(robust)  # per-point minimum over every attack run
    # each point's outcome, 8 a byte: what a paired comparison of two models on the same points needs. `attacks`:
    # robust under PGD, under CW, and after each AutoAttack stage (cumulative, as its cascade runs), so that runs
    # evaluated with different attack sets can be compared on the attacks they all received
    attacks = {f: pack_bits(masks[f].tolist()) for f in ("pgd", "cw") if f in families}
    attacks.update({a: pack_bits(m.tolist()) for a, m in state.get("aa_masks", {}).items()})
    out["points"] = {"clean": pack_bits(clean.tolist()), "robust": pack_bits(robust.tolist()), "attacks": attacks}
    out["seconds"] = {"clean": state["seconds"]["clean"],
                      **{f: sum(state["seconds"].get(s.name, 0.0) for s in stages if s.family == f) for f in families}}
    k = len(state["ex_fooled"])
    if k:
        adv = state["ex_adv"][:k].to(device)
        out["examples"] = {
            "labels": y[:k].tolist(), "clean_pred": predict(model, x[:k], bs).tolist(),
            "adv_pred": predict(model, adv, bs).tolist(), "robust": robust[:k].tolist(),
            "shape": list(x.shape[1:]),
            # uint8 pixels, hex-encoded: 8 small images stay a few KB of JSON
            "clean_u8": [(as_float(x[i]) * 255).round().to(torch.uint8).cpu().numpy().tobytes().hex()
                         for i in range(k)],
            "adv_u8": [(adv[i] * 255).round().to(torch.uint8).cpu().numpy().tobytes().hex() for i in range(k)]}
    return out

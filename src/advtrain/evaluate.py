"""Robustness evaluation: clean accuracy, PGD-k with restarts, and AutoAttack with a per-attack breakdown.

AutoAttack comes from the `pyautoattack` package (or the official `autoattack` module when that is installed).
We run its attacks as a cascade ourselves, one attack at a time on the points still robust, exactly as
`run_standard_evaluation` does internally, so that the robust accuracy after every stage is recorded.
The final robust accuracy is the per-point minimum over every attack run (PGD included)."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .attacks import predict, worst_case

AA_VERSIONS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"], "fast": ["apgd-ce", "apgd-t"]}


def _autoattack_module():
    """(module, name, keyword of the batch size): pyautoattack says batch_size=, the official module bs=."""
    try:
        import pyautoattack as aa

        return aa, "pyautoattack " + getattr(aa, "__version__", "?"), "batch_size"
    except ImportError:
        import autoattack as aa  # the official repository's module

        return aa, "autoattack (official)", "bs"


class _Collect(logging.Handler):
    """Collects AutoAttack's own warnings (its checks on the defence) and shows its progress lines."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.DEBUG)
        self.warnings: list[str] = []
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg.strip())
        if "successfully perturbed" not in msg:  # per-batch lines are too chatty
            self.log(f"[autoattack] {msg}")


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str,
               batch_size: int, seed: int, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """The AutoAttack cascade on (x, y); returns robust flags and the robust accuracy after each attack."""
    aa_mod, aa_name, bs_key = _autoattack_module()
    model.eval()
    adversary = aa_mod.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    attacks = AA_VERSIONS[version]
    logger = logging.getLogger("auto-attack")
    handler = _Collect(log)
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.DEBUG
    n = len(y)
    robust = predict(model, x, batch_size) == y
    x_adv = x.clone()
    after, seconds = {}, {}
    try:
        for attack in attacks:
            t0 = time.perf_counter()
            idx = robust.nonzero().squeeze(1)
            if len(idx):
                adversary.attacks_to_run = [attack]
                out = adversary.run_standard_evaluation(x[idx], y[idx], **{bs_key: batch_size})
                xa = (out[0] if isinstance(out, tuple) else out).to(x.device)  # pyautoattack: (x_adv, y_adv)
                fooled = predict(model, xa, batch_size) != y[idx]
                robust[idx[fooled]] = False
                x_adv[idx[fooled]] = xa[fooled]
            after[attack] = robust.sum().item() / n
            seconds[attack] = time.perf_counter() - t0
            log(f"[autoattack] robust accuracy after {attack}: {100 * after[attack]:.2f}% ({seconds[attack]:.1f}s)")
    finally:
        logger.removeHandler(handler)
        logger.level = old_level
    return {"version": version, "attacks": attacks, "robust_acc_after": after, "seconds_per_attack": seconds,
            "robust_acc": robust.sum().item() / n, "warnings": sorted(set(handler.warnings)), "package": aa_name,
            "robust": robust, "x_adv": x_adv}


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, ev: dict, seed: int,
             device: torch.device, log: Callable[[str], None] = print) -> dict:
    model.eval().to(device)
    x, y = x.to(device), y.to(device)
    n, bs = len(y), ev["batch_size"]
    out: dict = {"n_points": n}
    t0 = time.perf_counter()
    clean = predict(model, x, bs) == y
    acc = lambda mask: mask.sum().item() / n  # noqa: E731  (exact fractions of n, as AutoAttack reports them)
    out["clean_acc"] = acc(clean)
    out["seconds"] = {"clean": time.perf_counter() - t0}
    log(f"[evaluate] clean accuracy {100 * out['clean_acc']:.2f}% on {n} points")
    robust = clean.clone()
    if ev["pgd_steps"]:
        alpha = ev["pgd_alpha"] or eps / 4
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        pgd_robust, _ = worst_case(model, x, y, eps, alpha, ev["pgd_steps"], ev["pgd_restarts"], batch_size=bs)
        out["pgd"] = {"steps": ev["pgd_steps"], "restarts": ev["pgd_restarts"], "alpha": alpha,
                      "acc": acc(pgd_robust)}
        out["seconds"]["pgd"] = time.perf_counter() - t0
        robust &= pgd_robust
        log(f"[evaluate] PGD-{ev['pgd_steps']} x{ev['pgd_restarts']} accuracy {100 * out['pgd']['acc']:.2f}% "
            f"({out['seconds']['pgd']:.1f}s)")
    if ev["autoattack"] != "off":
        t0 = time.perf_counter()
        aa = autoattack(model, x, y, eps, ev["autoattack"], bs, seed, device, log)
        robust &= aa.pop("robust")
        aa.pop("x_adv")
        out["autoattack"] = aa
        out["seconds"]["autoattack"] = time.perf_counter() - t0
    out["robust_acc"] = acc(robust)  # per-point minimum over every attack run
    return out

"""A result in RobustBench's model-info shape: accuracies as percent strings, eps as a fraction, the threat model."""
from __future__ import annotations

from fractions import Fraction


def eps_text(eps: float, threat_model: str = "Linf") -> str:
    """As RobustBench writes it: L-inf radii as fractions (8/255; 0.1 -> 1/10), L2 radii as numbers (0.5)."""
    if threat_model != "Linf":
        return f"{eps:g}"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else str(Fraction(eps).limit_denominator(10_000))


def model_info(method: str, dataset: str, threat_model: str, eps: float, architecture: str, res: dict,
               n_test: int) -> dict:
    aa = res.get("autoattack", {})
    return {"name": f"advtrain {method}", "dataset": dataset, "threat_model": threat_model,
            "eps": eps_text(eps, threat_model),
            "architecture": architecture, "additional_data": False,
            "number_forward_passes": 1, "clean_acc": f"{100 * res['clean_acc']:.2f}",
            "autoattack_acc": f"{100 * aa['robust_acc']:.2f}" if aa else None,
            "autoattack_version": aa.get("version"), "n_points": res["n_points"],
            "full_test_set": res["n_points"] == n_test}

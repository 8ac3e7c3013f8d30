"""M+PGD: PGD adversarial training whose step count K is driven by the gradient-magnitude rule (magnitude.py).

K starts at 0 (plain training), is 1 in the second epoch, and grows by the rule up to `k_max` (7); the step size is
alpha_K = max(eps / K, alpha). G is measured at the training forward pass. (The reference script's `alpah` typo,
which crashes at K >= 5, has no counterpart here.)"""
from ..schema import choice, integer, number, optional
from ..magnitude import MagnitudeDriven
from .pgd import PGD


class MPGD(MagnitudeDriven, PGD):
    name = "mpgd"
    params = {"gamma": number(0, lo_open=True), "k_max": integer(1), "fraction": number(0, 1),
              "alpha": optional(number(0, 1, lo_open=True)), "attack_mode": choice("eval", "train")}
    defaults = {"gamma": 1.01, "k_max": 7, "fraction": 1.0, "alpha": None, "attack_mode": "eval"}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.make_rule("k_max", start=0)

    def step_size(self) -> float:
        return max(self.eps / max(1, self.rule.count), self.alpha)

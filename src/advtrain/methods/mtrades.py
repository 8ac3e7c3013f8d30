"""M+TRADES: TRADES whose inner step count is driven by the gradient-magnitude rule (magnitude.py),
from 0 up to `k_max` (10)."""
from ..schema import integer, number, optional
from ..magnitude import MagnitudeDriven
from .trades import TRADES


class MTRADES(MagnitudeDriven, TRADES):
    name = "mtrades"
    params = {"beta": number(0), "gamma": number(0, lo_open=True), "k_max": integer(1),
              "alpha": optional(number(0, 1, lo_open=True))}
    defaults = {"beta": 6.0, "gamma": 1.01, "k_max": 10, "alpha": None}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.make_rule("k_max", start=0)

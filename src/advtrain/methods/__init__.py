"""Training methods by name: each a per-minibatch strategy run by the shared trainer (see base.py)."""
from .base import Method
from .deat import DEAT
from .dynat import DYNAT
from .fgsm import FGSM
from .free import Free
from .mpgd import MPGD
from .mtrades import MTRADES
from .pgd import PGD
from .standard import Standard
from .trades import TRADES

METHODS: dict[str, type[Method]] = {m.name: m for m in (Standard, PGD, Free, DEAT, MPGD, FGSM, TRADES, MTRADES, DYNAT)}

"""Training methods by name: each a per-minibatch strategy run by the shared trainer (see base.py)."""
from .base import Method
from .pgd import PGD
from .standard import Standard

METHODS: dict[str, type[Method]] = {m.name: m for m in (Standard, PGD)}

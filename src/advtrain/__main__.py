"""`python -m advtrain`: what torchrun runs on each rank (commands/train.py relaunches `advtrain train` under it)."""
from .cli import entry

entry()

"""`python -m advtrain`: what torchrun runs on each rank (commands/train.py relaunches `advtrain train` under it)."""
import sys

from .cli import main

sys.exit(main())

"""`python -m entropix.cli`."""

from . import run

run()

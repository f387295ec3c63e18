"""entropix: entropy-guided sampling and parallel chain-of-thought decoding."""

__version__ = "0.1.0"


class EntropixError(Exception):
    """An error with a one-line message meant for the user (no traceback)."""

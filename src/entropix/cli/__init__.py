"""The `entropix` command line: one module per subcommand, shared options in common.py.

Library code never imports this package; it imports the library.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from .. import EntropixError, __version__
from . import bench, calibrate, chat, download, eval, export, generate, plan, plot, serve
from .common import eprint

# the order of `entropix --help`
SUBCOMMANDS = (generate, chat, bench, download, export, calibrate, plot, serve, eval, plan)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="entropix", description="Entropy-guided decoding for Llama-family models.")
    ap.add_argument("--version", action="version", version=f"entropix {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    try:
        return args.fn(args) or 0
    except EntropixError as e:
        eprint(f"entropix: error: {e}")
        return 2
    except KeyboardInterrupt:
        eprint("entropix: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for the user; ENTROPIX_DEBUG=1 shows it
        if os.environ.get("ENTROPIX_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        eprint(f"entropix: error: {type(e).__name__}: {msg} (set ENTROPIX_DEBUG=1 for the traceback)")
        return 1



def run() -> NoReturn:
    """The console script and `python -m entropix.cli`: main(), then exit with its status. A process
    that led tensor-parallel ranks leaves through `ranks.leave` (why: see there)."""
    code = main()
    ranks = sys.modules.get("entropix.backends.torch.ranks")  # loaded only where ranks were started
    if ranks is not None and ranks.started():
        ranks.leave(code)
    sys.exit(code)

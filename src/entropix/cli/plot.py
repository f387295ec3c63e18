"""`entropix plot`: a PNG of a `generate --json` run's per-token uncertainty."""

from __future__ import annotations

from pathlib import Path

from ..plots.tokens import plot_run, read_run
from ..sampler.config import SamplerConfig, load_profile
from .common import eprint


def cmd_plot(args) -> int:
    run = read_run(args.run)
    if args.sampler_config:
        cfg = SamplerConfig.from_json(args.sampler_config)
    else:
        cfg = load_profile(args.model or run.get("model"))
    out = Path(args.out) if args.out else Path(args.run).with_suffix(".png")
    plot_run(run, cfg, out)
    eprint(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plot", help="PNG of a run's (entropy, varentropy) plane and per-token timeline")
    p.add_argument("run", help="JSON written by `entropix generate --json`")
    p.add_argument("--out", "-o", default=None, help="PNG file (default: RUN with .png)")
    p.add_argument("--sampler-config", default=None, help="profile whose thresholds to draw (default: the run's model's)")
    p.add_argument("--model", default=None, help="take the built-in profile of this model instead of the run's")
    p.set_defaults(fn=cmd_plot)

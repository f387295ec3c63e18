"""`entropix calibrate`: entropix (or DSlider, lookahead) thresholds from a model's own metrics."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..evaluate.calibrate import CALIBRATION_QUANTILES, calibrate, load_prompts
from ..evaluate.calibrate_dslider import calibrate_dslider, calibrate_lookahead
from ..sampler.config import SamplerConfig
from ..sampler.dslider import DSliderConfig
from ..sampler.lookahead import Lookahead
from .common import add_model_args, eprint, load


def _cmd_other(args) -> int:
    """`calibrate --sampler dslider|lookahead` (see calibrate_dslider.py)."""
    kind = DSliderConfig if args.sampler == "dslider" else Lookahead
    base = kind.from_json(args.base) if args.base else kind()
    prompts = load_prompts(args.prompts)  # bad input fails before the model loads
    lm = load(args)
    eprint(f"calibrating {args.sampler} for {lm.name} on {len(prompts)} prompts, up to {args.max_tokens} greedy tokens each ...")
    fit = calibrate_dslider if args.sampler == "dslider" else calibrate_lookahead
    cfg, stats = fit(lm, prompts, args.max_tokens, args.batch_size, base, progress=True)
    fields = cfg.to_dict() if isinstance(cfg, DSliderConfig) else dataclasses.asdict(cfg)
    text = json.dumps({**fields, "_calibration": stats}, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        eprint(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    if isinstance(cfg, DSliderConfig):
        eprint(f"{stats['tokens']} tokens; outlier_bias {cfg.outlier_bias:g}, dirichlet_threshold {list(cfg.dirichlet_threshold)}")
        eprint("shares on the calibration tokens: " + ", ".join(f"{k} {v:.0%}" for k, v in stats["regime_shares"].items()))
    else:
        eprint(f"{stats['tokens']} tokens; min_entropy {cfg.min_entropy:g} bits: a search at {stats['search_share']:.0%} of them")
    return 0


def cmd_calibrate(args) -> int:
    if getattr(args, "sampler", "entropix") != "entropix":
        return _cmd_other(args)
    base = SamplerConfig.from_json(args.base) if args.base else SamplerConfig()
    prompts = load_prompts(args.prompts)  # bad input fails before the model loads
    lm = load(args)
    eprint(f"calibrating {lm.name} on {len(prompts)} prompts, up to {args.max_tokens} greedy tokens each ...")
    cfg, stats = calibrate(lm, prompts, args.max_tokens, args.batch_size, base, progress=True)
    text = cfg.to_json(extra={"_calibration": stats})
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        eprint(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    th = ", ".join(f"{k} {getattr(cfg, k):g}" for k in CALIBRATION_QUANTILES)
    eprint(f"{stats['tokens']} tokens; thresholds: {th}")
    eprint("shares on the calibration tokens: " + ", ".join(f"{k} {v:.0%}" for k, v in stats["regime_shares"].items()))
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="derive entropix (or dslider, lookahead) thresholds for a model from its own metrics")
    add_model_args(p)
    p.add_argument("--out", "-o", default=None, help="write the profile here (default: print it)")
    p.add_argument("--max-tokens", "-n", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--prompts", default=None, help="JSON-lines ({\"prompt\": ...}) or text file (default: the shipped set)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts decoded together")
    p.add_argument("--base", default=None, help="profile whose non-threshold settings the new one keeps")
    p.add_argument("--sampler", default="entropix", choices=("entropix", "dslider", "lookahead"),
                   help="whose thresholds: entropix (default), dslider (outlier and Dirichlet biases) or "
                        "lookahead (min_entropy)")
    p.set_defaults(fn=cmd_calibrate)

"""`entropix calibrate`: entropix (or DSlider, lookahead) thresholds from a model's own metrics."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .. import EntropixError
from ..evaluate.calibrate import CALIBRATION_QUANTILES, calibrate, load_prompts
from ..evaluate.calibrate_dslider import POLICIES, calibrate_dslider, calibrate_lookahead
from ..evaluate.dslider_onpolicy import TARGET
from ..sampler.config import SamplerConfig
from ..sampler.dslider import DSliderConfig
from ..sampler.lookahead import Lookahead
from .common import add_model_args, eprint, load


def _cmd_other(args) -> int:
    """`calibrate --sampler dslider|lookahead` (see calibrate_dslider.py)."""
    kind = DSliderConfig if args.sampler == "dslider" else Lookahead
    if args.sampler != "dslider" and (args.policy, args.target, args.seed) != (None, TARGET, 0):
        raise EntropixError("--policy, --target and --seed take --sampler dslider")
    base = kind.from_json(args.base) if args.base else kind()
    prompts = load_prompts(args.prompts)  # bad input fails before the model loads
    lm = load(args)
    eprint(f"calibrating {args.sampler} for {lm.name} on {len(prompts)} prompts, up to {args.max_tokens} greedy tokens each ...")
    if args.sampler == "dslider":
        cfg, stats = calibrate_dslider(lm, prompts, args.max_tokens, args.batch_size, base, progress=True,
                                       policy=args.policy or "onpolicy", target=args.target, seed=args.seed)
    else:
        cfg, stats = calibrate_lookahead(lm, prompts, args.max_tokens, args.batch_size, base, progress=True)
    fields = cfg.to_dict() if isinstance(cfg, DSliderConfig) else dataclasses.asdict(cfg)
    text = json.dumps({**fields, "_calibration": stats}, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        eprint(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    if isinstance(cfg, DSliderConfig):
        eprint(f"{stats['tokens']} tokens; outlier_bias {cfg.outlier_bias:g}, dirichlet_threshold {list(cfg.dirichlet_threshold)}")
        eprint("shares on the greedy calibration tokens: " + ", ".join(f"{k} {v:.0%}" for k, v in stats["regime_shares"].items()))
        if "on_policy" in stats:
            on = stats["on_policy"]
            eprint(f"on its own samples: dirichlet+ood {on['greedy_quantiles_on_policy']['outlier_share']:.0%} at the greedy "
                   f"quantiles, {on['on_policy']['outlier_share']:.0%} now ({on['decodes']} decodes, "
                   f"{on['tokens_decoded']} tokens)")
    else:
        eprint(f"{stats['tokens']} tokens; min_entropy {cfg.min_entropy:g} bits: a search at {stats['search_share']:.0%} of them")
    return 0


def cmd_calibrate(args) -> int:
    if getattr(args, "sampler", "entropix") != "entropix":
        return _cmd_other(args)
    if (getattr(args, "policy", None), getattr(args, "target", TARGET), getattr(args, "seed", 0)) != (None, TARGET, 0):
        raise EntropixError("--policy, --target and --seed take --sampler dslider")
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
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="dslider: onpolicy (default: the greedy quantiles, then the Dirichlet and if need be the "
                        "outlier bias moved until DSlider's own samples pass the target: up to 12 more decodes of "
                        "2 samples per prompt) or greedy (the quantiles only)")
    p.add_argument("--target", type=float, default=TARGET,
                   help="dslider onpolicy: most dirichlet+ood share of its own samples (default %(default)s; "
                        "the search aims 0.05 below)")
    p.add_argument("--seed", type=int, default=0, help="dslider onpolicy: sample k of prompt i has seed SEED + k * (prompts) + i")
    p.set_defaults(fn=cmd_calibrate)

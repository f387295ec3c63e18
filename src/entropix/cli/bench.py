"""`entropix bench`: decode speed against transformers, between samplers and weight modes."""

from __future__ import annotations

import json

from ..sampler import catalog
from .common import add_model_args, load


def cmd_bench(args) -> int:
    from ..bench.modes import parse_modes, run_modes_bench  # torch and transformers: only when run
    from ..bench.speed import run_bench

    for name in args.sampler or []:
        catalog.spec(name)
    if args.peer or args.modes:  # our weight modes against transformers and llama.cpp (bench_modes.py)
        modes = parse_modes(args.modes)
        lm = load(args, quiet=True)
        result = run_modes_bench(lm, modes, args.peer or [], tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                                 repeats=args.repeats, rss=not args.no_rss)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    lm = load(args, quiet=True)
    result = run_bench(lm, tokens=args.tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                       samplers=args.sampler or [], branches=args.branches, baseline=not args.no_transformers)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="decode speed against transformers and between samplers")
    add_model_args(b)
    b.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    b.add_argument("--prompt-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--sampler", action="append", help="also time this sampler against greedy (entropix, cot)")
    b.add_argument("--branches", type=int, default=None, help="cot: first-token branches (default: the catalogue's)")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    b.add_argument("--json", action="store_true")
    b.add_argument("--peer", action="append", choices=("llama.cpp",),
                   help="also time llama.cpp (llama-cpp-python) on the same GGUF; implies --modes")
    b.add_argument("--modes", default=None,
                   help="our weight modes to compare, e.g. none,int8+compile,int4 (default with --peer: "
                        "none,int8,int4,int4+compile)")
    b.add_argument("--no-rss", action="store_true", help="--modes: skip the peak-RSS subprocesses")
    b.set_defaults(fn=cmd_bench)

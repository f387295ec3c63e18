"""`entropix eval` and `entropix eval-report`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import EntropixError
from ..evaluate.report import eval_report
from ..evaluate.runner import run_eval, sampler_params
from ..evaluate.tasks import KNOWN_TASKS, Problem, load_task
from ..sampler import catalog
from .common import add_model_args, eprint, load


def _load_problems(args) -> list[Problem]:
    if args.task not in KNOWN_TASKS:
        raise EntropixError(f"unknown task {args.task!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    if args.limit is not None and args.limit < 0:
        raise EntropixError(f"--limit must be non-negative, got {args.limit}")
    if args.data is not None and args.task == "gsm8k":
        p = Path(args.data)
        if not p.is_file():
            raise EntropixError(f"--data file not found: {p}")
    problems = load_task(args.task, args.limit, args.seed, data=args.data)
    if not problems:
        raise EntropixError(f"task {args.task!r} has no problems to run")
    return problems


def _format_summary(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    tpp = s["tokens_per_problem"]
    return (f"{s['task']} / {s['sampler']}: {s['correct']}/{s['n']} correct = {s['accuracy']:.1%} "
            f"(95% CI {lo:.1%}-{hi:.1%}), {'-' if tpp is None else f'{tpp:.1f}'} tokens/problem, "
            f"{s['seconds']:.1f} s decoding")


def cmd_eval(args) -> int:
    name = catalog.variant(args.sampler, aggregate=args.aggregate)
    params = sampler_params(name, temperature=args.temperature, min_p=args.min_p, samples=args.samples,
                            branches=args.branches, aggregate=None if name == "cot-agg" else args.aggregate,
                            sampler_config=args.sampler_config)
    if args.max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise EntropixError(f"--batch-size must be at least 1, got {args.batch_size}")
    problems = _load_problems(args)
    lm = load(args, quiet=args.json or args.quiet)
    summary = run_eval(lm, problems, name, task=args.task, params=params, out=args.out, seed=args.seed,
                       max_tokens=args.max_tokens, batch_size=args.batch_size, label=args.label or name,
                       system=args.system, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_format_summary(summary))
        if summary["skipped"]:
            eprint(f"({summary['skipped']} problem(s) already in {args.out} were not rerun)")
    return 0


def cmd_eval_report(args) -> int:
    preamble = None
    if args.preamble:
        p = Path(args.preamble)
        if not p.is_file():
            raise EntropixError(f"--preamble file not found: {p}")
        preamble = p.read_text(encoding="utf-8")
    eval_report(args.results, args.out, title=args.title, preamble=preamble, compute_plot=args.compute_plot)
    print(args.out)
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a sampler on a task (GSM8K or synthetic), one JSONL row per problem",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate a sampler on a task.\n\nsamplers:\n" + "\n".join(
                           f"  {s.name:<20} {s.text}" for s in catalog.SPECS))
    e.add_argument("--task", required=True, help=f"one of: {', '.join(KNOWN_TASKS)}")
    e.add_argument("--sampler", default="greedy", help=f"one of: {', '.join(catalog.names())} (default greedy)")
    add_model_args(e)
    e.add_argument("--data", default=None, help="gsm8k: JSONL file with question/answer (default: the Hub test split)")
    e.add_argument("--limit", type=int, default=None, help="number of problems (synthetic default 100; gsm8k: all)")
    e.add_argument("--seed", type=int, default=0, help="synthetic problem set and sampling seed (default 0)")
    e.add_argument("--max-tokens", "-n", type=int, default=256, help="new tokens per row (default 256)")
    e.add_argument("--batch-size", "-b", type=int, default=16, help="rows decoded together (default 16)")
    e.add_argument("--out", "-o", default=None, help="results JSONL: rows appended as problems finish; done ids skipped")
    e.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    e.add_argument("--label", default=None, help="sampler name written into rows (default: the sampler)")
    e.add_argument("--system", default=None, help="system message for the chat template")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g = e.add_argument_group("sampler parameters")
    g.add_argument("--temperature", "-t", type=float, default=None, help="temperature, self-consistency, min-p")
    g.add_argument("--min-p", type=float, default=None, help=f"min-p threshold (default {catalog.default_of('min_p')})")
    g.add_argument("--samples", "-k", type=int, default=None,
                   help=f"self-consistency samples (default {catalog.default_of('samples')})")
    g.add_argument("--branches", type=int, default=None,
                   help=f"cot first-token branches (default {catalog.default_of('branches')})")
    g.add_argument("--aggregate", action="store_true", help="cot: aggregated path (same as --sampler cot-agg)")
    g.add_argument("--sampler-config", default=None, help="entropix: JSON profile of sampler settings")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("eval-report", help="markdown + PNG report from eval results JSONL files")
    r.add_argument("results", nargs="+", help="results JSONL file(s)")
    r.add_argument("--out", "-o", default="RESULTS.md", help="markdown file to write; charts go next to it")
    r.add_argument("--title", default="Evaluation results")
    r.add_argument("--preamble", default=None, help="markdown file inserted after the title (setup, machine, timings)")
    r.add_argument("--compute-plot", default=None,
                   help="PNG of accuracy (95%% CI) vs tokens per problem, one panel per task (default: OUT's stem + _compute.png)")
    r.set_defaults(fn=cmd_eval_report)

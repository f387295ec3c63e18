"""`entropix eval`: run one sampler over a task's problems, one JSONL row per problem.

Plain samplers (greedy, temperature, min-p, entropix) decode as single-row requests
through one `Engine`, kept full: finished problems leave and new ones join between
decode steps. Multi-row decoders (self-consistency, cot, entropix with branching)
have `run_many` and get whole chunks of prompts at once. Each problem is charged its
share of the wall time (a step's time split over the rows that took part), so the
per-problem seconds add up to the run's decoding time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from entropix import EntropixError
from entropix.evaluate.stats import wilson_interval
from entropix.evaluate.tasks import KNOWN_TASKS, Problem, format_prompt, is_correct, load_task

__all__ = ["SAMPLER_SPECS", "build_sampler", "load_done", "run_eval", "summarise", "register_cli"]


@dataclass(frozen=True)
class SamplerSpec:
    """How an eval sampler name maps onto `make_sampler`: factory, defaults, accepted options."""

    factory: str
    defaults: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()  # parameters the user may set for it
    help: str = ""
    requires: tuple[str, ...] = ()  # registered samplers the factory builds on


SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "greedy": SamplerSpec("greedy", help="argmax at every step"),
    "temperature": SamplerSpec("sample", {"temperature": 0.7}, ("temperature",), "plain sampling, T=0.7"),
    "min-p": SamplerSpec("sample", {"temperature": 1.0, "min_p": 0.1}, ("temperature", "min_p"), "min_p 0.1 at T=1"),
    "self-consistency": SamplerSpec("self-consistency", {"samples": 5, "temperature": 0.7}, ("samples", "temperature"),
                                    "majority vote over k=5 samples at T=0.7"),
    "cot": SamplerSpec("cot", {"branches": 10, "aggregate": False}, ("branches", "aggregate"),
                       "CoT decoding, max path over 10 first-token branches"),
    "cot-agg": SamplerSpec("cot", {"branches": 10, "aggregate": True}, ("branches",),
                           "CoT decoding, aggregated path"),
    "entropix": SamplerSpec("entropix", {}, ("sampler_config",), "entropy-guided sampling"),
    "entropix-branching": SamplerSpec("entropix-branching", {}, ("sampler_config",),
                                      "entropix with entropy-triggered branching", requires=("entropix",)),
}

_OPTION_FLAGS = {"temperature": "--temperature", "min_p": "--min-p", "samples": "--samples",
                 "branches": "--branches", "aggregate": "--aggregate", "sampler_config": "--sampler-config"}


def _unknown_sampler(name: str) -> EntropixError:
    return EntropixError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLER_SPECS)}")


def sampler_params(name: str, **given: Any) -> dict[str, Any]:
    """The full parameter set for an eval sampler: its defaults overridden by the given (non-None) values."""
    spec = SAMPLER_SPECS.get(name)
    if spec is None:
        raise _unknown_sampler(name)
    params = dict(spec.defaults)
    for key, value in given.items():
        if value is None or value is False:
            continue
        if key not in spec.options:
            raise EntropixError(f"{_OPTION_FLAGS.get(key, key)} does not apply to sampler {name!r}")
        params[key] = value
    from entropix.sampling import check_params

    check_params(params.get("temperature"), None, None, params.get("min_p"))
    if name in ("temperature", "self-consistency") and params.get("temperature") == 0:
        raise EntropixError(f"sampler {name!r} needs --temperature > 0 (use greedy for 0)")
    for key in ("samples", "branches"):
        if key in params and (not isinstance(params[key], int) or params[key] < 1):
            raise EntropixError(f"{_OPTION_FLAGS[key]} must be at least 1, got {params[key]}")
    if "sampler_config" in params and not Path(params["sampler_config"]).is_file():
        raise EntropixError(f"sampler config file not found: {params['sampler_config']}")
    return params


def build_sampler(name: str, lm, params: dict[str, Any]):
    """The sampler object for an eval sampler name and its parameters (from `sampler_params`)."""
    from entropix.sampling import SAMPLERS, _load_registered, make_sampler

    spec = SAMPLER_SPECS.get(name)
    if spec is None:
        raise _unknown_sampler(name)
    if spec.factory not in ("greedy", "sample"):
        _load_registered()
        for need in (spec.factory, *spec.requires):
            if need not in SAMPLERS:
                raise EntropixError(f"sampler {name!r} is not available: no {need!r} decoder is registered")
    return make_sampler(spec.factory, lm=lm, **params)


# ------------------------------------------------------------------------------ decoding


@dataclass
class Outcome:
    """What decoding produced for one problem."""

    problem: Problem
    index: int  # position in the problem list
    output: str
    tokens: int
    seconds: float
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def problem_seed(seed: int, problem_id: str) -> int:
    """A per-problem seed, so a problem's sample depends neither on batching nor on resuming."""
    return (int(seed) * 1_000_003 + zlib.crc32(problem_id.encode())) & 0x7FFF_FFFF


def prompt_tokens(lm, problem: Problem, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": format_prompt(problem)}]
    return lm.tokenizer.encode_chat(msgs)


def decode_plain(lm, sampler, items: Sequence[tuple[int, Problem, list[int]]], *, max_tokens: int, seed: int,
                 batch_size: int) -> Iterator[Outcome]:
    """Single-row requests through one engine kept up to batch_size rows; yields as problems finish."""
    from entropix.generate import Engine, Request

    engine = Engine(lm, capture_layers=getattr(sampler, "capture_layers", (-1,)))
    pending = deque(items)
    live: dict[str, dict[str, Any]] = {}
    # Refill in groups, so that prefills are batched rather than one prompt per step.
    refill_at = max(1, batch_size // 4)
    while pending or engine.active:
        free = batch_size - len(engine.rows)
        if pending and (free >= refill_at or not engine.active):
            new = []
            while pending and len(new) < free:
                index, problem, ids = pending.popleft()
                rid = f"eval-{index}"
                new.append(Request(prompt=ids, sampler=sampler, max_tokens=max_tokens,
                                   seed=problem_seed(seed, problem.id), stop_ids=lm.tokenizer.stop_ids,
                                   top_logprobs=1, id=rid))
                live[rid] = {"index": index, "problem": problem, "text": [], "tokens": 0, "seconds": 0.0,
                             "finish": None}
            t0 = time.perf_counter()
            engine.add(new)
            share = (time.perf_counter() - t0) / len(new)
            for r in new:
                live[r.id]["seconds"] += share
        t0 = time.perf_counter()
        records = engine.step()
        share = (time.perf_counter() - t0) / max(1, len(records))
        for rec in records:
            st = live[rec.request_id]
            st["seconds"] += share
            st["tokens"] += 1
            if rec.choice == 0:
                st["text"].append(rec.text)
                if rec.finish_reason:
                    st["finish"] = rec.finish_reason
        still = {r.request.id for r in engine.rows}
        for rid in dict.fromkeys(rec.request_id for rec in records if rec.request_id not in still):
            st = live.pop(rid)
            yield Outcome(st["problem"], st["index"], "".join(st["text"]), st["tokens"], st["seconds"], st["finish"])


_NUM = r"(\d*\.?\d+)"
_BIG = r"(?:larger|bigger|greater|higher)"
# Where a compare answer states its choice ("9.9 is larger", "the larger is 9.9", "9.9 > 9.11",
# "answer is 9.9"): the last number of the text is often the smaller one ("9.9 is larger than 9.11").
COMPARE_PATTERN = (
    rf"(?i)\banswer\s+is\s*:?\s*\**\s*{_NUM}"
    rf"|{_NUM}\s*\**\s*(?:is|was)\s+(?:the\s+)?{_BIG}"
    rf"|{_BIG}(?:\s+(?:number|one|value))?\s*(?:is|:|=)\s*\**\s*{_NUM}"
    rf"|{_NUM}\s*>|<\s*{_NUM}"
)


def answer_kind(problem: Problem) -> tuple[str, str | None]:
    """The (kind, pattern) a multi-row decoder should look for in this problem's outputs.

    It decides which tokens CoT decoding scores and what self-consistency votes on;
    grading is separate (tasks.is_correct on the chosen text).
    """
    if problem.extra.get("format") == "yesno":
        return "pattern", r"(?i)\b(yes|no)\b"
    if problem.extra.get("format") == "compare":
        return "number", COMPARE_PATTERN
    if problem.kind in ("number", "list", "option", "text", "pattern"):
        return problem.kind, problem.extra.get("pattern")
    return "number", None


def _rows_per_problem(sampler) -> int:
    """About how many rows a multi-row decoder keeps per prompt (to size its chunks)."""
    for attr in ("rows_per_prompt", "samples", "branches"):
        v = getattr(sampler, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    max_rows = getattr(getattr(sampler, "cfg", None), "max_rows", None)
    if isinstance(max_rows, int) and max_rows > 0:
        # Entropy-triggered branching forks only now and then: count a quarter of its row cap.
        return max(1, max_rows // 4)
    return 1


def _compact(value: Any, depth: int = 0) -> Any:
    """Branch records without bulky token lists or per-token records (rows stay readable)."""
    if isinstance(value, dict):
        return {k: _compact(v, depth + 1) for k, v in value.items()
                if k not in ("records", "tokens", "token_ids", "top", "logprobs")}
    if isinstance(value, (list, tuple)):
        return [_compact(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def decode_multi(lm, sampler, items: Sequence[tuple[int, Problem, list[int]]], *, max_tokens: int, seed: int,
                 batch_size: int) -> Iterator[Outcome]:
    """Chunks of prompts through the decoder's run_many; about batch_size rows per chunk."""
    from entropix.generate import Engine

    engine = Engine(lm, capture_layers=getattr(sampler, "capture_layers", (-1,)))
    per_call = max(1, batch_size // _rows_per_problem(sampler))
    i = 0
    while i < len(items):
        kind = answer_kind(items[i][1])
        chunk = [items[i]]
        i += 1
        while i < len(items) and len(chunk) < per_call and answer_kind(items[i][1]) == kind:
            chunk.append(items[i])
            i += 1
        t0 = time.perf_counter()
        results = sampler.run_many(engine, [ids for _, _, ids in chunk], max_tokens=max_tokens,
                                   seed=[problem_seed(seed, p.id) for _, p, _ in chunk], kind=kind[0],
                                   pattern=kind[1])
        dt = time.perf_counter() - t0
        if len(results) != len(chunk):
            raise RuntimeError(f"run_many returned {len(results)} results for {len(chunk)} prompts")
        total = sum(int(r.get("tokens_generated", 0)) for r in results)
        for (index, problem, _), res in zip(chunk, results):
            tokens = int(res.get("tokens_generated", 0))
            # Time in proportion to the tokens decoded for the problem: rows of one chunk run together.
            secs = dt * tokens / total if total else dt / len(chunk)
            extra = {"decoder_answer": res.get("answer"), "branches": _compact(res.get("branches", []))}
            yield Outcome(problem, index, res.get("text") or "", tokens, secs, res.get("finish_reason"), extra)


# ------------------------------------------------------------------------------ results files


def load_done(path: Path) -> list[dict]:
    """Rows already in a results file; a partially written last line is cut off so appends stay valid."""
    if not path.exists():
        return []
    if not path.is_file():
        raise EntropixError(f"--out is not a file: {path}")
    raw = path.read_bytes()
    rows: list[dict] = []
    pos = 0  # byte offset of the current line
    for n, line in enumerate(raw.split(b"\n"), start=1):
        nxt = pos + len(line) + 1
        if line.strip():
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and "id" in row
            except ValueError:
                ok = False
            if not ok:
                if raw[nxt:].strip():  # not the last line: the file is damaged, not interrupted
                    raise EntropixError(f"{path}:{n}: not a results row; refusing to append to this file")
                with path.open("r+b") as f:  # an interrupted write: drop it
                    f.truncate(pos)
                print(f"entropix: warning: {path}:{n}: dropped a partially written last line", file=sys.stderr)
                return rows
            rows.append(row)
        pos = nxt
    if raw and not raw.endswith(b"\n"):
        with path.open("ab") as f:
            f.write(b"\n")
    return rows


def summarise(rows: Sequence[dict], task: str, sampler: str) -> dict[str, Any]:
    """The run summary (Wilson 95% interval) over result rows."""
    n = len(rows)
    correct = sum(bool(r.get("correct")) for r in rows)
    lo, hi = wilson_interval(correct, n)
    tokens = [r["tokens"] for r in rows if isinstance(r.get("tokens"), (int, float))]
    return {
        "task": task, "sampler": sampler, "n": n, "correct": correct,
        "accuracy": round(correct / n, 6) if n else 0.0,
        "ci95": [round(lo, 6), round(hi, 6)],
        "tokens_per_problem": round(sum(tokens) / len(tokens), 3) if tokens else None,
        "seconds": round(sum(float(r.get("seconds") or 0.0) for r in rows), 3),
    }


def run_eval(lm, problems: Sequence[Problem], sampler_name: str, *, task: str, params: dict[str, Any] | None = None,
             out: str | Path | None = None, seed: int = 0, max_tokens: int = 256, batch_size: int = 16,
             label: str | None = None, system: str | None = None, progress: bool = True,
             sampler=None) -> dict[str, Any]:
    """Evaluate problems with a sampler; append rows to out as they finish; return the summary.

    Problems whose (task, sampler label, id) already have a row in out are skipped, and
    the summary covers them too.
    """
    if max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise EntropixError(f"--batch-size must be at least 1, got {batch_size}")
    params = sampler_params(sampler_name) if params is None else params
    label = label or sampler_name
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EntropixError(f"problem id {dup!r} appears more than once")

    out_path = Path(out) if out else None
    done: dict[str, dict] = {}
    if out_path is not None:
        for row in load_done(out_path):
            if row.get("task") == task and row.get("sampler") == label:
                done[str(row["id"])] = row  # the last row for an id wins, as in the report
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    if sampler is None and todo:
        sampler = build_sampler(sampler_name, lm, params)

    rows_by_id = {pid: done[pid] for pid in ids if pid in done}
    t_start = time.perf_counter()
    fh = None
    if out_path is not None and todo:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fh = out_path.open("a", encoding="utf-8")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"{task}/{label}", unit="problem",
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    try:
        if todo:
            items = [(i, p, prompt_tokens(lm, p, system)) for i, p in todo]
            decode = decode_multi if hasattr(sampler, "run_many") else decode_plain
            right = sum(bool(r.get("correct")) for r in rows_by_id.values())
            for oc in decode(lm, sampler, items, max_tokens=max_tokens, seed=seed, batch_size=batch_size):
                extracted, ok = is_correct(oc.problem, oc.output)
                row = {
                    "id": oc.problem.id, "task": task, "sampler": label, "model": lm.name,
                    "prompt": format_prompt(oc.problem), "output": oc.output, "extracted": extracted,
                    "expected": oc.problem.expected, "correct": ok, "tokens": oc.tokens,
                    "seconds": round(oc.seconds, 4), "finish_reason": oc.finish_reason,
                    "seed": seed, "max_tokens": max_tokens, "params": params, **oc.extra,
                }
                rows_by_id[oc.problem.id] = row
                if fh is not None:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    fh.flush()  # a killed run keeps every finished problem
                right += ok
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(acc=f"{right / len(rows_by_id):.1%}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if fh is not None:
            fh.close()
    summary = summarise([rows_by_id[pid] for pid in ids if pid in rows_by_id], task, label)
    summary.update(model=getattr(lm, "name", None), skipped=len(problems) - len(todo),
                   wall_seconds=round(time.perf_counter() - t_start, 3))
    return summary


# ------------------------------------------------------------------------------ CLI


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
    from entropix.cli import eprint, load

    if args.sampler not in SAMPLER_SPECS:
        raise _unknown_sampler(args.sampler)
    name = "cot-agg" if args.sampler == "cot" and args.aggregate else args.sampler
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
    from entropix.evaluate.report import eval_report

    preamble = None
    if args.preamble:
        p = Path(args.preamble)
        if not p.is_file():
            raise EntropixError(f"--preamble file not found: {p}")
        preamble = p.read_text(encoding="utf-8")
    eval_report(args.results, args.out, title=args.title, preamble=preamble)
    print(args.out)
    return 0


def register_cli(sub) -> None:
    from entropix.cli import add_model_args

    e = sub.add_parser("eval", help="evaluate a sampler on a task (GSM8K or synthetic), one JSONL row per problem",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate a sampler on a task.\n\nsamplers:\n" + "\n".join(
                           f"  {k:<20} {v.help}" for k, v in SAMPLER_SPECS.items()))
    e.add_argument("--task", required=True, help=f"one of: {', '.join(KNOWN_TASKS)}")
    e.add_argument("--sampler", default="greedy", help=f"one of: {', '.join(SAMPLER_SPECS)} (default greedy)")
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
    g.add_argument("--min-p", type=float, default=None, help="min-p threshold (default 0.1)")
    g.add_argument("--samples", "-k", type=int, default=None, help="self-consistency samples (default 5)")
    g.add_argument("--branches", type=int, default=None, help="cot first-token branches (default 10)")
    g.add_argument("--aggregate", action="store_true", help="cot: aggregated path (same as --sampler cot-agg)")
    g.add_argument("--sampler-config", default=None, help="entropix: JSON profile of sampler settings")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("eval-report", help="markdown + PNG report from eval results JSONL files")
    r.add_argument("results", nargs="+", help="results JSONL file(s)")
    r.add_argument("--out", "-o", default="RESULTS.md", help="markdown file to write; charts go next to it")
    r.add_argument("--title", default="Evaluation results")
    r.add_argument("--preamble", default=None, help="markdown file inserted after the title (setup, machine, timings)")
    r.set_defaults(fn=cmd_eval_report)

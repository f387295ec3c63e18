"""`entropix eval`: run one sampler over a task's problems, one JSONL row per problem.

Single-row samplers (greedy, temperature, min-p, entropix) decode as requests through one
host `Engine`, kept full: finished problems leave and new ones join between decode steps.
Multi-row strategies (self-consistency, cot, entropix with branching) run through
`decode.strategies` on whole chunks of prompts at once. Each problem is charged its
share of the wall time (a step's time split over the rows that took part), so the
per-problem seconds add up to the run's decoding time.
"""

from __future__ import annotations

import contextlib
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
from entropix.sampler import catalog
from entropix.sampler.catalog import Decoder
from entropix.evaluate.stats import wilson_interval
from entropix.answer_format import resolve_answer_format
from entropix.evaluate.tasks import Problem, format_prompt, is_correct

__all__ = ["answer_kind", "load_done", "run_eval", "sampler_params", "summarise"]


def sampler_params(name: str, **given: Any) -> dict[str, Any]:
    """The full parameter set for a sampler: its catalogue defaults overridden by the given
    (non-None) values; a value the sampler does not take is an error here."""
    return catalog.parameters(name, strict=True, **given)


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


def decode_plain(lm, dec: Decoder, items: Sequence[tuple[int, Problem, list[int]]], *, max_tokens: int, seed: int,
                 batch_size: int) -> Iterator[Outcome]:
    """Single-row requests through one engine kept up to batch_size rows; yields as problems finish."""
    from entropix.decode.records import Request

    engine = lm.engine(dec.capture_layers)
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
                new.append(Request(prompt=ids, policy=dec.policy, max_tokens=max_tokens,
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


def answer_kind(problem: Problem) -> tuple[str, str | None]:
    """The (kind, pattern) a multi-row decoder should look for in this problem's outputs.

    Read from the prompt the model is given, by the reader `entropix generate` and the server
    use on a user's prompt: the decoder measured is the one users run, never one told the task's
    own format. It decides which tokens CoT decoding scores and what self-consistency votes on;
    grading is separate (tasks.is_correct on the chosen text).
    """
    return resolve_answer_format(format_prompt(problem))


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


def decode_multi(lm, dec: Decoder, items: Sequence[tuple[int, Problem, list[int]]], *, max_tokens: int, seed: int,
                 batch_size: int) -> Iterator[Outcome]:
    """Chunks of prompts through the decoder's strategy; about batch_size rows per chunk."""
    from entropix.decode.strategies import Task, decode, run

    engine = lm.engine(dec.capture_layers)
    per_call = max(1, batch_size // dec.rows_per_prompt)
    i = 0
    while i < len(items):
        kind = answer_kind(items[i][1])
        chunk = [items[i]]
        i += 1
        while i < len(items) and len(chunk) < per_call and answer_kind(items[i][1]) == kind:
            chunk.append(items[i])
            i += 1
        task = Task(prompts=[ids for _, _, ids in chunk], max_tokens=[max_tokens] * len(chunk),
                    seeds=[problem_seed(seed, p.id) for _, p, _ in chunk], stop_ids=lm.tokenizer.stop_ids,
                    kind=kind[0], pattern=kind[1])
        t0 = time.perf_counter()
        results = run(engine, decode(dec, task, lm.tokenizer, lm.config.max_position_embeddings))
        dt = time.perf_counter() - t0
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


def _check_run(problems: Sequence[Problem], max_tokens: int, batch_size: int) -> None:
    if max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise EntropixError(f"--batch-size must be at least 1, got {batch_size}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EntropixError(f"problem id {dup!r} appears more than once")


def _done_rows(out_path: Path | None, task: str, label: str) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if out_path is not None:
        for row in load_done(out_path):
            if row.get("task") == task and row.get("sampler") == label:
                done[str(row["id"])] = row  # the last row for an id wins, as in the report
    return done


def _progress(progress: bool, total: int, todo: int, desc: str):
    if not (progress and todo):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=total - todo, desc=desc, unit="problem", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def _row(oc: Outcome, task: str, label: str, model: str, seed: int, max_tokens: int,
         params: dict[str, Any]) -> dict[str, Any]:
    extracted, ok = is_correct(oc.problem, oc.output)
    return {
        "id": oc.problem.id, "task": task, "sampler": label, "model": model,
        "prompt": format_prompt(oc.problem), "output": oc.output, "extracted": extracted,
        "expected": oc.problem.expected, "correct": ok, "tokens": oc.tokens,
        "seconds": round(oc.seconds, 4), "finish_reason": oc.finish_reason,
        "seed": seed, "max_tokens": max_tokens, "params": params, **oc.extra,
    }


def run_eval(lm, problems: Sequence[Problem], sampler_name: str, *, task: str, params: dict[str, Any] | None = None,
             out: str | Path | None = None, seed: int = 0, max_tokens: int = 256, batch_size: int = 16,
             label: str | None = None, system: str | None = None, progress: bool = True,
             decoder: Decoder | None = None) -> dict[str, Any]:
    """Evaluate problems with a sampler; append rows to out as they finish; return the summary.

    Problems whose (task, sampler label, id) already have a row in out are skipped, and
    the summary covers them too.
    """
    _check_run(problems, max_tokens, batch_size)
    if decoder is not None:  # the rows record what actually decoded
        params = dict(decoder.params)
    params = sampler_params(sampler_name) if params is None else params
    label = label or sampler_name
    ids = [p.id for p in problems]
    out_path = Path(out) if out else None
    done = _done_rows(out_path, task, label)
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    rows_by_id = {pid: done[pid] for pid in ids if pid in done}
    t_start = time.perf_counter()
    if todo:
        decoder = decoder or catalog.build(sampler_name, params, lm)
        bar = _progress(progress, len(problems), len(todo), f"{task}/{label}")
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("a", encoding="utf-8") if out_path is not None else contextlib.nullcontext() as fh:
            try:
                _decode_rows(lm, decoder, todo, rows_by_id, fh, bar, system=system, task=task, label=label,
                             seed=seed, max_tokens=max_tokens, batch_size=batch_size, params=params)
            finally:
                if bar is not None:
                    bar.close()
    summary = summarise([rows_by_id[pid] for pid in ids if pid in rows_by_id], task, label)
    summary.update(model=getattr(lm, "name", None), skipped=len(problems) - len(todo),
                   wall_seconds=round(time.perf_counter() - t_start, 3))
    return summary


def _decode_rows(lm, decoder: Decoder, todo, rows_by_id: dict[str, dict], fh, bar, *, system, task: str,
                 label: str, seed: int, max_tokens: int, batch_size: int, params: dict[str, Any]) -> None:
    """Decode the problems still to do; each finished row is written (and flushed) at once."""
    items = [(i, p, prompt_tokens(lm, p, system)) for i, p in todo]
    decode = decode_plain if decoder.strategy == "single" else decode_multi
    right = sum(bool(r.get("correct")) for r in rows_by_id.values())
    for oc in decode(lm, decoder, items, max_tokens=max_tokens, seed=seed, batch_size=batch_size):
        row = _row(oc, task, label, lm.name, seed, max_tokens, params)
        rows_by_id[oc.problem.id] = row
        if fh is not None:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()  # a killed run keeps every finished problem
        right += row["correct"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{right / len(rows_by_id):.1%}", refresh=False)

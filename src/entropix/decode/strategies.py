"""Multi-row strategies, written once for every front end.

- CoT decoding (Wang & Zhou 2024): each prompt is prefilled once and shared by k rows;
  row c starts with the c-th most likely first token and continues greedily. A branch's
  confidence is the mean top-1 minus top-2 probability over its answer's tokens; a
  branch without an answer is asked "So the answer is".
- Self-consistency: k seeded samples, majority vote over their answers.
- Entropy-triggered branching: rows fork into their top alternatives where the
  entropix state says "branch" (the engine does the forking), and the tree is scored.

A strategy is a generator: it yields a `Phase` of requests, receives their records
(request id -> choice -> records) and finally returns one result per prompt. `run`
drives it on an engine synchronously (CLI, evaluation, bench); the server drives the
same generator through its scheduler.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from ..sampler.catalog import Decoder
from ..sampler.policy import Greedy
from .records import Request, TokenRecord
from .scoring import Branch, answer_confidence, branch_of, majority_vote, result, vote_shares

ANSWER_PROMPT = "\nSo the answer is"
FOLLOW_UP_TOKENS = 16
Records = dict[str, dict[int, list[TokenRecord]]]


@dataclass(frozen=True)
class Task:
    """What to decode, and what an answer looks like (strategies score and vote on it)."""

    prompts: Sequence[Sequence[int]]
    max_tokens: Sequence[int]  # per prompt
    seeds: Sequence[int | None]  # per prompt
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    top_logprobs: int = 2
    n: int = 1  # rows per prompt for the single strategy
    kind: str = "number"
    pattern: str | None = None
    follow_up: bool = True  # ask "So the answer is" of CoT branches without an answer


@dataclass
class Phase:
    requests: list[Request]
    shown: bool  # its rows are the answer's choices (False: follow-ups, counted in usage only)


Strategy = Generator[Phase, Records, list[dict[str, Any]]]


def decode(decoder: Decoder, task: Task, tokenizer: Any, max_context: int) -> Strategy:
    """The strategy generator for a decoder."""
    if decoder.strategy == "auto":  # its own file; it builds on this one
        from .auto import guarded_cot

        return guarded_cot(decoder, task, tokenizer, max_context)
    run = {"single": _single, "cot": _cot, "self-consistency": _self_consistency, "branching": _branching}
    return run[decoder.strategy](decoder, task, tokenizer, max_context)


def _requests(decoder: Decoder, task: Task, n: int, top_logprobs: int) -> list[Request]:
    return [Request(prompt=list(p), policy=decoder.policy, n=n, max_tokens=mt, seed=s, stop_ids=task.stop_ids,
                    stop_strings=task.stop_strings, top_logprobs=top_logprobs, branching=decoder.branching)
            for p, mt, s in zip(task.prompts, task.max_tokens, task.seeds)]


def _single(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    yield Phase(_requests(decoder, task, task.n, task.top_logprobs), True)
    return [{} for _ in task.prompts]


def _cot(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    k, aggregate = decoder.params["branches"], bool(decoder.params.get("aggregate"))
    reqs = _requests(decoder, task, k, max(2, task.top_logprobs))
    got = yield Phase(reqs, True)
    branches = [[branch_of(c, got[r.id][c], task.kind, task.pattern) for c in range(k)] for r in reqs]
    spent = [sum(len(b.tokens) for b in bs) for bs in branches]
    if task.follow_up:
        extra = yield from follow_ups(task, branches, tok, max_context)
        spent = [s + e for s, e in zip(spent, extra)]
    return [result(bs, aggregate, task.kind, s) for bs, s in zip(branches, spent)]


def follow_ups(task: Task, branches: list[list[Branch]], tok: Any, max_context: int):
    """Ask "So the answer is" (greedily, in one batch) of every branch that gave no answer.

    The answer is the first one after the phrase. Returns the tokens spent per prompt.
    """
    suffix = tok.encode(ANSWER_PROMPT, add_bos=False)  # mid-sequence: never a BOS
    reqs, where = [], []
    for p, (prompt, bs) in enumerate(zip(task.prompts, branches)):
        for b in bs:
            body = _body(b, task, tok)
            if b.answer is not None or len(prompt) + len(body) + len(suffix) + FOLLOW_UP_TOKENS >= max_context:
                continue  # answered, or no room left to ask
            reqs.append(Request(prompt=list(prompt) + body + suffix, policy=Greedy(), max_tokens=FOLLOW_UP_TOKENS,
                                stop_ids=task.stop_ids, stop_strings=task.stop_strings, top_logprobs=2))
            where.append((p, b))
    spent = [0] * len(task.prompts)
    if not reqs:
        return spent
    got = yield Phase(reqs, False)
    for req, (p, b) in zip(reqs, where):
        recs = got[req.id][0]
        spent[p] += len(recs)
        answer, conf, _ = answer_confidence(recs, task.kind, task.pattern, prefix=ANSWER_PROMPT)
        if answer is not None:
            b.answer, b.confidence = answer, conf
            b.follow_up = ANSWER_PROMPT + "".join(r.text for r in recs)
    return spent


def _body(b: Branch, task: Task, tok: Any) -> list[int]:
    """A branch's tokens to continue from: without its stop token, and cut before a stop
    string that ended it (its tokens still hold that string; its text does not)."""
    if task.stop_strings and b.finish_reason == "stop" and (not b.tokens or b.tokens[-1] not in task.stop_ids):
        return tok.encode(b.text, add_bos=False)
    return [t for t in b.tokens if t not in task.stop_ids]


def _self_consistency(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    k = decoder.params["samples"]
    reqs = _requests(decoder, task, k, max(2, task.top_logprobs))
    got = yield Phase(reqs, True)
    out = []
    for r in reqs:
        bs = [branch_of(c, got[r.id][c], task.kind, task.pattern) for c in range(k)]
        answer, i, votes = majority_vote([b.answer for b in bs], task.kind)
        vote_shares(bs, votes, task.kind)
        out.append({"branches": [b.to_dict() for b in bs], "choice": i, "answer": answer, "text": bs[i].text,
                    "votes": votes, "tokens_generated": sum(len(b.tokens) for b in bs)})
    return out


def _branching(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    reqs = _requests(decoder, task, 1, max(5, task.top_logprobs))
    got = yield Phase(reqs, True)
    return [branch_tree(got[r.id], task.kind, task.pattern) for r in reqs]


def branch_tree(per: dict[int, list[TokenRecord]], kind: str, pattern: str | None) -> dict[str, Any]:
    """Score every path of a forked request; a fork's text starts with its ancestors' prefix."""
    parents = {c: recs[0].parent for c, recs in per.items() if recs and recs[0].parent is not None}
    bs = []
    for c in sorted(per):
        recs = fork_prefix(per, parents, *parents[c]) + per[c] if c in parents else per[c]
        b = branch_of(c, recs, kind, pattern)
        b.parent = parents.get(c)
        if b.answer is None:  # no answer: a path's confidence is half its mean margin, below answered ones
            b.confidence = sum(b.margins) / max(len(b.margins), 1) * 0.5
        bs.append(b)
    res = result(bs, False, kind, sum(len(v) for v in per.values()))
    if res["answer"] is None and bs:  # no path answered: the most confident one
        best = max(range(len(bs)), key=lambda i: (bs[i].confidence, -i))
        res["choice"], res["text"] = best, bs[best].full_text
    res["forks"] = len(set(parents.values()))  # fork points (each may start several rows)
    return res


def fork_prefix(per: dict[int, list[TokenRecord]], parents: dict[int, tuple[int, int]], choice: int,
                at: int) -> list[TokenRecord]:
    """Records of `choice` before index `at`, following its own fork history."""
    own = [r for r in per.get(choice, []) if r.index < at]
    if choice in parents:
        return fork_prefix(per, parents, *parents[choice]) + own
    return own


# -- driving a strategy on an engine ------------------------------------------------------

def collect(engine: Any, requests: list[Request], on_record: Callable[[TokenRecord], None] | None = None) -> Records:
    """Run requests to the end on an engine; their records by request id and choice."""
    engine.add(requests)
    out: Records = {r.id: defaultdict(list) for r in requests}
    while any(r.request.id in out for r in engine.rows):
        for rec in engine.step():
            if rec.request_id in out:
                out[rec.request_id][rec.choice].append(rec)
                if on_record is not None:
                    on_record(rec)
    return out


def run(engine: Any, strategy: Strategy, on_record: Callable[[TokenRecord], None] | None = None) -> list[dict]:
    """Drive a strategy to its results on an engine (on_record sees the shown rows' records)."""
    try:
        phase = next(strategy)
        while True:
            phase = strategy.send(collect(engine, phase.requests, on_record if phase.shown else None))
    except StopIteration as stop:
        return stop.value

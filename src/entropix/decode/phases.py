"""The protocol every multi-row strategy follows, and driving one on an engine.

A strategy is a generator: it yields a `Phase` of requests, receives their records
(request id -> choice -> records) and finally returns one result per prompt. `run`
drives it on an engine synchronously (CLI, evaluation, bench); the server drives the
same generator through its scheduler. `follow_ups` is the phase CoT and `auto` share:
"So the answer is" asked of the branches that gave no answer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from ..sampler.catalog import Decoder
from ..sampler.policy import Greedy
from .records import Request, TokenRecord
from .scoring import Branch, answer_confidence

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
    token_budget: int | None = None  # per prompt, the most tokens a voting strategy may spend (deepconf, sc-early)


@dataclass
class Phase:
    requests: list[Request]
    shown: bool  # its rows are the answer's choices (False: follow-ups, counted in usage only)


Strategy = Generator[Phase, Records, list[dict[str, Any]]]


def requests_for(decoder: Decoder, task: Task, n: int, top_logprobs: int) -> list[Request]:
    return [Request(prompt=list(p), policy=decoder.policy, n=n, max_tokens=mt, seed=s, stop_ids=task.stop_ids,
                    stop_strings=task.stop_strings, top_logprobs=top_logprobs, branching=decoder.branching)
            for p, mt, s in zip(task.prompts, task.max_tokens, task.seeds)]


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

"""Multi-row strategies, written once for every front end.

- CoT decoding (Wang & Zhou 2024): each prompt is prefilled once and shared by k rows;
  row c starts with the c-th most likely first token and continues greedily. A branch's
  confidence is the mean top-1 minus top-2 probability over its answer's tokens; a
  branch without an answer is asked "So the answer is".
- Self-consistency: k seeded samples, majority vote over their answers; its cheaper kin,
  confidence-pruned voting and early-stopping self-consistency, are in deepconf.py.
- Entropy-triggered branching: rows fork into their top alternatives where the
  entropix regime is "branch" (the engine does the forking), and the tree is scored.

Each is a generator of request phases (the protocol and its driver `run`: phases.py).
"""

from __future__ import annotations

from typing import Any

from ..sampler.catalog import Decoder
from .auto import guarded_cot
from .deepconf import deepconf, sc_early
from .phases import (ANSWER_PROMPT, Phase, Records, Strategy, Task, collect, follow_ups, requests_for,
                     run)
from .records import TokenRecord
from .scoring import branch_of, majority_vote, result, vote_shares

# the protocol and the driver live in phases.py; callers take them from here too
__all__ = ["ANSWER_PROMPT", "Phase", "Records", "Strategy", "Task", "branch_tree", "collect", "decode", "follow_ups",
           "fork_prefix", "run"]

def decode(decoder: Decoder, task: Task, tokenizer: Any, max_context: int) -> Strategy:
    """The strategy generator for a decoder."""
    if decoder.strategy == "auto":  # its own file: CoT guarded by a greedy probe
        return guarded_cot(decoder, task, tokenizer, max_context)
    run = {"single": _single, "cot": _cot, "self-consistency": _self_consistency, "branching": _branching,
           "deepconf": deepconf, "sc-early": sc_early}
    return run[decoder.strategy](decoder, task, tokenizer, max_context)


def _single(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    yield Phase(requests_for(decoder, task, task.n, task.top_logprobs), True)
    return [{} for _ in task.prompts]


def _cot(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    k, aggregate = decoder.params["branches"], bool(decoder.params.get("aggregate"))
    reqs = requests_for(decoder, task, k, max(2, task.top_logprobs))
    got = yield Phase(reqs, True)
    branches = [[branch_of(c, got[r.id][c], task.kind, task.pattern) for c in range(k)] for r in reqs]
    spent = [sum(len(b.tokens) for b in bs) for bs in branches]
    if task.follow_up:
        extra = yield from follow_ups(task, branches, tok, max_context)
        spent = [s + e for s, e in zip(spent, extra)]
    return [result(bs, aggregate, task.kind, s) for bs, s in zip(branches, spent)]


def _self_consistency(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    k = decoder.params["samples"]
    reqs = requests_for(decoder, task, k, max(2, task.top_logprobs))
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
    reqs = requests_for(decoder, task, 1, max(5, task.top_logprobs))
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

"""Voting that spends less: confidence-pruned voting and early-stopping self-consistency.

Both draw the samples self-consistency draws with the same seed: row c of a prompt has the
seed row_seed(seed, c) in whichever phase it runs (Request.first_choice), so a pruned or
skipped trace is one that self-consistency would have decoded in full, and the two compare
on equal samples.

- deepconf: `warmup` traces decode in full. A trace's confidence is its lowest mean token
  confidence over `window` consecutive tokens (scoring.py); the threshold is the warm-up
  confidences' (1 - keep) quantile. The other traces decode with a prune rule at that
  threshold: a row stops, and frees its slot, at the first window below it. The answer is
  the confidence-weighted vote of the traces not pruned. Where the warm-up's own weighted vote
  already gives one answer at least `consensus` of the warm-up weight (traces without an answer
  count in the whole), the other traces are not decoded: DeepConf's consensus stop.
- sc-early: `first` samples; when they all give one answer it stands, else the other samples
  decode too and the majority of all of them wins.

`Task.token_budget` caps what a prompt may spend: the second phase gets only as many rows
as its remaining budget holds at max_tokens each.
"""

from __future__ import annotations

from typing import Any

from ..sampler.catalog import Decoder
from .phases import Phase, Records, Strategy, Task, requests_for
from .records import PruneRule, Request
from .scoring import (Branch, answer_groups, branch_of, lowest_window_confidence, majority_vote, token_confidence,
                      vote_shares)

TOP_K = 5  # alternatives per token in the token confidence


def _rows_left(task: Task, p: int, want: int, spent: int) -> int:
    if task.token_budget is None:
        return want
    return max(0, min(want, (task.token_budget - spent) // max(task.max_tokens[p], 1)))


def _branches(got: Records, req: Request, task: Task) -> list[Branch]:
    return [branch_of(c, recs, task.kind, task.pattern) for c, recs in sorted(got[req.id].items())]


def _trace_confidence(got: Records, req: Request, window: int) -> dict[int, float]:
    return {c: lowest_window_confidence([token_confidence([lp for _, _, lp in r.top[:TOP_K]]) for r in recs], window)
            for c, recs in got[req.id].items()}


def threshold(confidences: list[float], keep: float) -> float:
    """The (1 - keep) quantile of the warm-up confidences (lower): about `keep` of traces like them pass."""
    ranked = sorted(confidences)
    return ranked[min(int((1.0 - keep) * len(ranked)), len(ranked) - 1)]


def weighted_vote(branches: list[Branch], weights: list[float], kind: str) -> tuple[str | None, int, dict[str, float]]:
    """(answer, index of its most confident trace, summed weight per answer) over the traces
    that were not pruned; equal answers ("72", "72.0") pool their weights; ties go to the earliest."""
    live = [i for i, b in enumerate(branches) if b.answer is not None and b.finish_reason != "pruned"]
    if not live:
        return None, 0, {}
    groups = [[live[j] for j in g] for g in answer_groups([branches[i].answer or "" for i in live], kind)]
    best = max(groups, key=lambda g: (sum(weights[i] for i in g), -g[0]))
    top = max(best, key=lambda i: (weights[i], -i))
    votes = {branches[g[0]].answer or "": round(sum(weights[i] for i in g), 6) for g in groups}
    return branches[best[0]].answer, top, votes


def settled(warm: list[Branch], weights: list[float], kind: str, consensus: float) -> bool:
    """Whether the warm-up traces' weighted vote gives one answer at least `consensus` of their weight."""
    answer, _, votes = weighted_vote(warm, weights, kind)
    total = sum(weights)
    return answer is not None and total > 0 and max(votes.values()) / total >= consensus - 1e-6  # votes are rounded


def deepconf(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    q = decoder.params
    n, warm, window, keep = q["samples"], min(q["warmup"], q["samples"]), q["window"], q["keep"]
    first = requests_for(decoder, task, warm, max(TOP_K, task.top_logprobs))
    got = yield Phase(first, True)
    traces = [_branches(got, r, task) for r in first]
    conf = [_trace_confidence(got, r, window) for r in first]
    cut = [threshold(list(c.values()), keep) for c in conf]
    later = {p: r.again(n=k, first_choice=warm, prune=PruneRule(window, cut[p], TOP_K)) for p, r in enumerate(first)
             if not settled(traces[p], [conf[p][b.choice] for b in traces[p]], task.kind, q["consensus"])
             and (k := _rows_left(task, p, n - warm, sum(len(b.tokens) for b in traces[p]))) > 0}
    if later:
        more = yield Phase(list(later.values()), True)
        for p, r in later.items():
            traces[p] += _branches(more, r, task)
            conf[p].update(_trace_confidence(more, r, window))
    return [_deepconf_result(bs, [c[b.choice] for b in bs], th, task.kind) for bs, c, th in zip(traces, conf, cut)]


def _deepconf_result(bs: list[Branch], weights: list[float], cut: float, kind: str) -> dict[str, Any]:
    answer, i, votes = weighted_vote(bs, weights, kind)
    for b, w in zip(bs, weights):
        b.confidence = w
    return {"branches": [b.to_dict() for b in bs], "choice": i, "answer": answer, "text": bs[i].text if bs else "",
            "votes": votes, "threshold": round(cut, 6), "pruned": sum(b.finish_reason == "pruned" for b in bs),
            "tokens_generated": sum(len(b.tokens) for b in bs)}


def _unanimous(bs: list[Branch], kind: str) -> bool:
    answer, _, votes = majority_vote([b.answer for b in bs], kind)
    return answer is not None and len(votes) == 1 and all(b.answer is not None for b in bs)


def sc_early(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    n, first_n = decoder.params["samples"], min(decoder.params["first"], decoder.params["samples"])
    first = requests_for(decoder, task, first_n, max(2, task.top_logprobs))
    got = yield Phase(first, True)
    traces = [_branches(got, r, task) for r in first]
    later = {p: r.again(n=k, first_choice=first_n) for p, r in enumerate(first)
             if not _unanimous(traces[p], task.kind)
             and (k := _rows_left(task, p, n - first_n, sum(len(b.tokens) for b in traces[p]))) > 0}
    if later:
        more = yield Phase(list(later.values()), True)
        for p, r in later.items():
            traces[p] += _branches(more, r, task)
    out = []
    for p, bs in enumerate(traces):
        answer, i, votes = majority_vote([b.answer for b in bs], task.kind)
        vote_shares(bs, votes, task.kind)
        out.append({"branches": [b.to_dict() for b in bs], "choice": i, "answer": answer, "text": bs[i].text,
                    "votes": votes, "stopped_early": p not in later and len(bs) < n,
                    "tokens_generated": sum(len(b.tokens) for b in bs)})
    return out

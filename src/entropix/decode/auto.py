"""`--sampler auto`: CoT decoding that keeps the greedy answer unless the evidence says otherwise.

1. A greedy probe per prompt (not shown) gives the greedy answer and its confidence (the
   mean top-1 minus top-2 probability over the answer's tokens). Where that is at least
   `gate_confidence` the model is sure: the prompt's answer is the greedy one (its row is
   decoded again as the shown choice, so the server streams it like any other).
2. Elsewhere the prompt decodes as CoT branches (row c starts with the c-th most likely
   first token, then greedy; row 0 is the greedy path), and branches without an answer are
   asked "So the answer is", as in plain CoT decoding.
3. The greedy answer is replaced only when another answer's score beats greedy's by
   `margin`; `score` says how an answer scores: its best branch's confidence ("max"), the
   sum over its branches ("sum", the agg path) or its number of branches ("votes").

The thresholds come from development data (benchmarks/compute_experiments.py); their
measured cost and effect are in docs/RESULTS.md.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..sampler.catalog import Decoder
from ..sampler.policy import Greedy
from .records import Request
from .scoring import Branch, answer_groups, branch_of
from .phases import Phase, Strategy, Task, follow_ups


SCORES = ("max", "sum", "votes")


def guarded_choice(scored: Sequence[tuple[str | None, float]], margin: float, score: str = "max",
                   kind: str = "number") -> tuple[int, str | None]:
    """(index, answer) from (answer, confidence) pairs whose first is the greedy branch.

    An answer's score is its best single confidence ("max", CoT's max path), the summed
    confidence of the branches giving it ("sum", the agg path) or their number ("votes").
    Another answer wins only when its score is above the greedy answer's plus margin, so
    margin 0 is plain CoT decoding. A greedy branch without an answer scores 0.
    """
    if score == "votes":
        scored = [(a, 1.0) for a, _ in scored]
    answered = [(i, a, c) for i, (a, c) in enumerate(scored) if a is not None]
    if not answered:
        return 0, None
    if score != "max":
        groups = [[answered[j] for j in g] for g in answer_groups([a for _, a, _ in answered], kind)]
        scores = [sum(c for _, _, c in g) for g in groups]
        own = next((s for g, s in zip(groups, scores) if g[0][0] == 0), 0.0)
        best = max(range(len(groups)), key=lambda j: (scores[j], -groups[j][0][0]))
        if groups[best][0][0] == 0 or scores[best] <= own + margin:
            return 0, scored[0][0]
        i, a, _ = max(groups[best], key=lambda t: (t[2], -t[0]))
        return i, a
    own = scored[0][1] if scored[0][0] is not None else 0.0
    others = [t for t in answered if t[0] != 0]
    if not others:
        return 0, scored[0][0]
    i, a, c = max(others, key=lambda t: (t[2], -t[0]))
    return (i, a) if c > own + margin else (0, scored[0][0])


def guarded_cot(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    """The auto strategy generator (greedy probe, gated branches, follow-ups, guarded choice)."""
    p = decoder.params
    k, gate, margin, score = p["branches"], float(p["gate_confidence"]), float(p["margin"]), p["score"]
    probes = [Request(prompt=list(pr), policy=Greedy(), max_tokens=mt, stop_ids=task.stop_ids,
                      stop_strings=task.stop_strings, top_logprobs=2)
              for pr, mt in zip(task.prompts, task.max_tokens)]
    got = yield Phase(probes, False)
    sure = [branch_of(0, got[r.id][0], task.kind, task.pattern) for r in probes]
    spent = [len(b.tokens) for b in sure]
    reqs = [Request(prompt=list(pr), policy=decoder.policy, n=1 if g.answer is not None and g.confidence >= gate else k,
                    max_tokens=mt, seed=s, stop_ids=task.stop_ids, stop_strings=task.stop_strings,
                    top_logprobs=max(2, task.top_logprobs))
            for pr, mt, s, g in zip(task.prompts, task.max_tokens, task.seeds, sure)]
    got = yield Phase(reqs, True)  # a sure prompt's one row is its probe again: the shown rows are the answer
    branches = [[branch_of(c, got[r.id][c], task.kind, task.pattern) for c in range(r.n)] for r in reqs]
    spent = [s + sum(len(b.tokens) for b in bs) for s, bs in zip(spent, branches)]
    if task.follow_up:
        extra = yield from follow_ups(task, branches, tok, max_context)
        spent = [s + e for s, e in zip(spent, extra)]
    return [auto_result(bs, margin, score, task.kind, s) for bs, s in zip(branches, spent)]


def auto_result(branches: list[Branch], margin: float, score: str, kind: str,
                tokens_generated: int) -> dict[str, Any]:
    i, answer = guarded_choice([(b.answer, b.confidence) for b in branches], margin, score, kind)
    return {"branches": [b.to_dict() for b in branches], "choice": i, "answer": answer,
            "text": branches[i].full_text if branches else "", "score": score,
            "tokens_generated": tokens_generated, "gated": len(branches) > 1}

"""`--sampler auto`: CoT decoding that keeps the greedy answer unless the evidence says otherwise.

1. A one-token greedy probe per prompt reads the entropy (bits) of the first-token
   distribution. Where it is below `gate_entropy` the model is sure how to start: the
   prompt decodes greedily (one row) and nothing more is spent.
2. Elsewhere the prompt decodes as CoT branches (row c starts with the c-th most likely
   first token, then greedy; row 0 is the greedy path), and branches without an answer are
   asked "So the answer is", as in plain CoT decoding.
3. The greedy answer is replaced only when another answer's confidence beats it by
   `margin`: with `aggregate`, an answer's confidence is the sum of its branches'
   answer-span margins (the agg path); otherwise the best single branch's margin.

The thresholds come from development data (benchmarks/compute_experiments.py); their
measured cost and effect are in docs/RESULTS.md.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..sampler.catalog import Decoder
from ..sampler.policy import Greedy
from .records import Request
from .scoring import Branch, _groups, branch_of
from .strategies import Phase, Strategy, Task, follow_ups


def guarded_choice(scored: Sequence[tuple[str | None, float]], margin: float, aggregate: bool,
                   kind: str = "number") -> tuple[int, str | None]:
    """(index, answer) from (answer, confidence) pairs whose first is the greedy branch.

    Another answer wins only when its score (aggregate: summed confidence of the branches
    giving it; else its best single confidence) is above the greedy answer's plus margin, so
    margin 0 is plain CoT decoding (max or agg path). A greedy branch without an answer scores 0.
    """
    answered = [(i, a, c) for i, (a, c) in enumerate(scored) if a is not None]
    if not answered:
        return 0, None
    if aggregate:
        groups = [[answered[j] for j in g] for g in _groups([a for _, a, _ in answered], kind)]
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


def _first_entropy(per: dict[int, list]) -> float:
    recs = per.get(0) or []
    return float(recs[0].entropy) if recs else float("inf")


def guarded_cot(decoder: Decoder, task: Task, tok: Any, max_context: int) -> Strategy:
    """The auto strategy generator (probe, gated branches, follow-ups, guarded choice)."""
    p = decoder.params
    k, gate, margin, aggregate = p["branches"], float(p["gate_entropy"]), float(p["margin"]), bool(p["aggregate"])
    probes = [Request(prompt=list(pr), policy=Greedy(), max_tokens=1, stop_ids=task.stop_ids, top_logprobs=1)
              for pr in task.prompts]
    got = yield Phase(probes, False)
    entropy = [_first_entropy(got[r.id]) for r in probes]
    spent = [sum(len(v) for v in got[r.id].values()) for r in probes]
    reqs = [Request(prompt=list(pr), policy=decoder.policy, n=k if h >= gate else 1, max_tokens=mt, seed=s,
                    stop_ids=task.stop_ids, stop_strings=task.stop_strings, top_logprobs=max(2, task.top_logprobs))
            for pr, mt, s, h in zip(task.prompts, task.max_tokens, task.seeds, entropy)]
    got = yield Phase(reqs, True)
    branches = [[branch_of(c, got[r.id][c], task.kind, task.pattern) for c in range(r.n)] for r in reqs]
    spent = [s + sum(len(b.tokens) for b in bs) for s, bs in zip(spent, branches)]
    if task.follow_up:
        extra = yield from follow_ups(task, branches, tok, max_context)
        spent = [s + e for s, e in zip(spent, extra)]
    return [auto_result(bs, margin, aggregate, task.kind, s, h, gate) for bs, s, h in zip(branches, spent, entropy)]


def auto_result(branches: list[Branch], margin: float, aggregate: bool, kind: str, tokens_generated: int,
                entropy: float, gate: float) -> dict[str, Any]:
    i, answer = guarded_choice([(b.answer, b.confidence) for b in branches], margin, aggregate, kind)
    return {"branches": [b.to_dict() for b in branches], "choice": i, "answer": answer,
            "text": branches[i].full_text if branches else "", "aggregate": aggregate,
            "tokens_generated": tokens_generated, "first_entropy": round(entropy, 4), "gated": entropy >= gate}

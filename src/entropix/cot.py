"""Chain-of-thought decoding, self-consistency and entropy-triggered branching.

All three are rows of one batch in the engine, never sequential runs:
- CoT decoding (Wang & Zhou 2024): the prompt is prefilled once and shared by k rows;
  row c starts with the c-th most likely first token and continues greedily. A branch's
  confidence is the mean top-1 minus top-2 probability over the tokens of its answer.
- Self-consistency: k seeded temperature samples, majority vote over their answers.
- Entropy-triggered branching: the entropix sampler forks a row into its top
  alternatives where its metrics say "branch", under a row and fork budget.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import EntropixError
from .answers import answer_span, answers_equal, extract_answer
from .generate import Engine, Request, TokenRecord
from .sampling import SAMPLERS, PlainSampler, SamplingParams

ANSWER_PROMPT = "\nSo the answer is"


@dataclass
class Branch:
    choice: int
    tokens: list[int]
    text: str
    answer: str | None
    confidence: float
    answer_tokens: list[int]  # indices (in tokens) that formed the answer
    margins: list[float]
    finish_reason: str | None = None
    parent: tuple[int, int] | None = None  # (choice, token index) a fork came from

    def to_dict(self) -> dict[str, Any]:
        d = {"choice": self.choice, "tokens": self.tokens, "text": self.text, "answer": self.answer,
             "confidence": round(self.confidence, 6), "answer_tokens": self.answer_tokens,
             "finish_reason": self.finish_reason}
        if self.parent is not None:
            d["parent"] = list(self.parent)
        return d


# -- scoring ------------------------------------------------------------------------------

def answer_confidence(records: Sequence[TokenRecord], kind: str = "number", pattern: str | None = None):
    """(answer, confidence, answer token indices) of one decoded sequence.

    The answer span is found in the text; a token belongs to it when the characters
    it produced overlap the span. Only those tokens' margins count.
    """
    text, bounds = "", []
    for r in records:
        start = len(text)
        text += r.text
        bounds.append((start, len(text)))
    span = answer_span(text, kind, pattern)
    if span is None:
        return None, 0.0, []
    a, b = span
    idx = [i for i, (s, e) in enumerate(bounds) if s < b and e > a]
    if not idx:
        return None, 0.0, []
    conf = sum(records[i].margin for i in idx) / len(idx)
    return extract_answer(text, kind, pattern), conf, idx


def choose(scored: Sequence[tuple[str | None, float]], aggregate: bool) -> tuple[int, str | None]:
    """Index and answer chosen from (answer, confidence) pairs.

    Max path: the most confident answered branch. Agg path: the answer with the largest
    summed confidence, represented by its most confident branch. Ties go to the earliest.
    """
    answered = [(i, a, c) for i, (a, c) in enumerate(scored) if a is not None]
    if not answered:
        return 0, None
    if aggregate:
        totals: dict[str, float] = defaultdict(float)
        for _, a, c in answered:
            totals[a] += c
        best_answer = max(totals, key=lambda a: (totals[a], -min(i for i, b, _ in answered if b == a)))
        answered = [t for t in answered if t[1] == best_answer]
    i, a, _ = max(answered, key=lambda t: (t[2], -t[0]))
    return i, a


def majority_vote(answers: Sequence[str | None], kind: str = "number") -> tuple[str | None, int, dict[str, int]]:
    """(winning answer, first index that gave it, votes per answer); equal answers
    ("72", "72.0") vote together; ties go to the earliest."""
    groups: list[tuple[str, list[int]]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for rep, members in groups:
            if answers_equal(rep, a, kind):
                members.append(i)
                break
        else:
            groups.append((a, [i]))
    if not groups:
        return None, 0, {}
    best = max(groups, key=lambda g: (len(g[1]), -g[1][0]))
    return best[0], best[1][0], {rep: len(m) for rep, m in groups}


def score_branches(records_per_branch: Sequence[Sequence[TokenRecord]], aggregate: bool = False,
                   kind: str = "number", pattern: str | None = None) -> dict[str, Any]:
    """Score finished branches from their token records (no follow-up decoding)."""
    branches = [_branch(c, recs, kind, pattern) for c, recs in enumerate(records_per_branch)]
    return _result(branches, aggregate)


def _branch(choice: int, recs: Sequence[TokenRecord], kind: str, pattern: str | None) -> Branch:
    answer, conf, idx = answer_confidence(recs, kind, pattern)
    return Branch(choice, [r.token for r in recs], "".join(r.text for r in recs), answer, conf, idx,
                  [r.margin for r in recs], recs[-1].finish_reason if recs else None)


def _result(branches: list[Branch], aggregate: bool, tokens_generated: int | None = None) -> dict[str, Any]:
    i, answer = choose([(b.answer, b.confidence) for b in branches], aggregate)
    return {
        "branches": [b.to_dict() for b in branches], "choice": i, "answer": answer,
        "text": branches[i].text if branches else "", "aggregate": aggregate,
        "tokens_generated": tokens_generated if tokens_generated is not None else sum(len(b.tokens) for b in branches),
    }


# -- running many prompts through the engine -----------------------------------------------

def prompt_seeds(seed: int | Sequence[int | None] | None, n: int) -> list[int | None]:
    """One seed per prompt: a list is taken as given; an int gives prompt j its own offset."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise EntropixError(f"got {len(seed)} seeds for {n} prompts")
        return list(seed)
    return [None if seed is None else int(seed) + 7919 * j for j in range(n)]


def _collect(engine: Engine, requests: list[Request], stream=None, label=None) -> dict[str, dict[int, list[TokenRecord]]]:
    engine.add(requests)  # gives each request its id
    out: dict[str, dict[int, list[TokenRecord]]] = {r.id: defaultdict(list) for r in requests}
    ids = set(out)
    while any(r.request.id in ids for r in engine.rows):
        for rec in engine.step():
            if rec.request_id in out:
                out[rec.request_id][rec.choice].append(rec)
                if stream is not None and label is not None:
                    label(stream, rec)
    return out


def _follow_up(engine: Engine, prompts: list[list[int]], branches: list[list[Branch]],
               kind: str, pattern: str | None, max_tokens: int = 16) -> list[int]:
    """Ask "So the answer is" of every branch that gave no answer; tokens spent per prompt."""
    tok = engine.tok
    suffix = tok.encode(ANSWER_PROMPT, add_bos=False)
    greedy = PlainSampler(SamplingParams(0.0))
    reqs, where = [], []
    for p, (prompt, bs) in enumerate(zip(prompts, branches)):
        for b in bs:
            if b.answer is None:
                body = [t for t in b.tokens if t not in tok.stop_ids]
                if len(prompt) + len(body) + len(suffix) + max_tokens >= engine.max_context:
                    continue  # no room left to ask
                reqs.append(Request(prompt=prompt + body + suffix, sampler=greedy,
                                    max_tokens=max_tokens, stop_ids=tok.stop_ids, top_logprobs=1))
                where.append((p, b))
    spent = [0] * len(prompts)
    if not reqs:
        return spent
    got = _collect(engine, reqs)
    for req, (p, b) in zip(reqs, where):
        recs = got[req.id][0]
        spent[p] += len(recs)
        answer, conf, _ = answer_confidence(recs, kind, pattern)
        if answer is not None:
            b.answer, b.confidence = answer, conf
            b.text += ANSWER_PROMPT + "".join(r.text for r in recs)
    return spent


class CotSampler:
    """First step: row c takes the c-th most likely token. Afterwards: greedy."""

    states = ("cot-branch", "greedy")
    needs_attention = False

    def __init__(self, branches: int = 10, aggregate: bool = False, **_: Any) -> None:
        if not 1 <= int(branches) <= 64:
            raise EntropixError(f"branches must be between 1 and 64, got {branches}")
        self.branches, self.aggregate = int(branches), bool(aggregate)

    def __call__(self, logits: torch.Tensor, metrics: dict, rows):
        tokens = logits.argmax(-1)
        first = [i for i, r in enumerate(rows) if not r.tokens]
        codes = torch.ones_like(tokens)
        if first:
            k = max(rows[i].choice for i in first) + 1
            ranked = logits[first].topk(k, dim=-1).indices  # [f, k]
            pick = torch.tensor([rows[i].choice for i in first], device=logits.device)
            idx = torch.tensor(first, device=logits.device)
            tokens[idx] = ranked.gather(1, pick[:, None])[:, 0]
            codes[idx] = 0
        return tokens, codes

    def state_of(self, code: int) -> str:
        return self.states[code]

    def run_many(self, engine: Engine, prompts: list[list[int]], max_tokens: int = 256, seed: int | None = None,
                 kind: str = "number", pattern: str | None = None, ignore_stop: bool = False,
                 follow_up: bool = True, stream=None) -> list[dict[str, Any]]:
        stops = frozenset() if ignore_stop else engine.tok.stop_ids
        reqs = [Request(prompt=p, sampler=self, n=self.branches, max_tokens=max_tokens, seed=s,
                        stop_ids=stops, top_logprobs=2) for p, s in zip(prompts, prompt_seeds(seed, len(prompts)))]
        got = _collect(engine, reqs, stream, _stream_label if stream is not None else None)
        all_branches = [[_branch(c, got[r.id][c], kind, pattern) for c in range(self.branches)] for r in reqs]
        spent = [sum(len(b.tokens) for b in bs) for bs in all_branches]
        if follow_up:
            extra = _follow_up(engine, prompts, all_branches, kind, pattern)
            spent = [s + e for s, e in zip(spent, extra)]
        return [_result(bs, self.aggregate, s) for bs, s in zip(all_branches, spent)]

    def run(self, engine: Engine, prompt: list[int], max_tokens: int = 256, seed: int | None = None,
            stream=None, ignore_stop: bool = False, **kw: Any) -> dict[str, Any]:
        res = self.run_many(engine, [prompt], max_tokens, seed, ignore_stop=ignore_stop,
                            follow_up=not ignore_stop, stream=stream, **kw)[0]
        if stream is not None:
            print_branches(res, stream)
        return res


class SelfConsistency:
    """k seeded temperature samples of one prompt in one batch; majority vote."""

    needs_attention = False

    def __init__(self, samples: int = 5, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, **_: Any) -> None:
        if not 1 <= int(samples) <= 64:
            raise EntropixError(f"samples must be between 1 and 64, got {samples}")
        self.samples = int(samples)
        self.params = SamplingParams(temperature=0.7 if temperature is None else temperature,
                                     top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0)

    def run_many(self, engine: Engine, prompts: list[list[int]], max_tokens: int = 256, seed: int | None = None,
                 kind: str = "number", pattern: str | None = None, ignore_stop: bool = False,
                 stream=None) -> list[dict[str, Any]]:
        stops = frozenset() if ignore_stop else engine.tok.stop_ids
        sampler = PlainSampler(self.params)
        reqs = [Request(prompt=p, sampler=sampler, n=self.samples, max_tokens=max_tokens, seed=s,
                        stop_ids=stops, top_logprobs=2) for p, s in zip(prompts, prompt_seeds(seed, len(prompts)))]
        got = _collect(engine, reqs, stream, _stream_label if stream is not None else None)
        out = []
        for r in reqs:
            bs = [_branch(c, got[r.id][c], kind, pattern) for c in range(self.samples)]
            answer, i, votes = majority_vote([b.answer for b in bs], kind)
            for b in bs:  # a sample's "confidence" here is its answer's share of the vote
                share = max((v for a, v in votes.items() if b.answer is not None and answers_equal(a, b.answer, kind)),
                            default=0)
                b.confidence = share / self.samples
            out.append({"branches": [b.to_dict() for b in bs], "choice": i, "answer": answer,
                        "text": bs[i].text, "votes": dict(votes),
                        "tokens_generated": sum(len(b.tokens) for b in bs)})
        return out

    def run(self, engine: Engine, prompt: list[int], max_tokens: int = 256, seed: int | None = None,
            stream=None, ignore_stop: bool = False, **kw: Any) -> dict[str, Any]:
        res = self.run_many(engine, [prompt], max_tokens, seed, ignore_stop=ignore_stop, stream=stream, **kw)[0]
        if stream is not None:
            print_branches(res, stream)
        return res


# -- entropy-triggered branching --------------------------------------------------------

@dataclass(frozen=True)
class BranchingConfig:
    max_rows: int = 8  # live rows per request
    max_forks: int = 6  # forks per request over the whole answer
    width: int = 2  # alternatives taken at a fork (besides the chosen token)
    min_prob: float = 0.05  # an alternative must have at least this probability


class BranchingSampler:
    """Wraps the entropix sampler: forks rows whose state is "branch" (engine.plan_forks)."""

    def __init__(self, inner, config: BranchingConfig = BranchingConfig()) -> None:
        self.inner, self.cfg = inner, config
        self.needs_attention = getattr(inner, "needs_attention", False)
        self.capture_layers = getattr(inner, "capture_layers", (-1,))
        self.states = getattr(inner, "states", ())
        self.forks_used = 0
        self.parents: dict[int, tuple[int, int]] = {}  # child choice -> (parent choice, fork index)
        self._branch_code = list(self.states).index("branch") if "branch" in self.states else -1

    def __call__(self, logits, metrics, rows):
        return self.inner(logits, metrics, rows)

    def state_of(self, code: int) -> str:
        return self.inner.state_of(code)

    def plan_forks(self, rows, decisions):
        import math

        plans = []
        live = len(rows)
        for i, (tok, code, _, top) in enumerate(decisions):
            if code != self._branch_code or self.forks_used >= self.cfg.max_forks or live >= self.cfg.max_rows:
                continue
            stops = rows[i].request.stop_ids  # a fork that stops at once wastes the budget
            alts = [t for t, lp in top if t != tok and t not in stops and math.exp(lp) >= self.cfg.min_prob]
            alts = alts[: self.cfg.width]
            alts = alts[: self.cfg.max_rows - live]
            if alts:
                plans.append((i, alts))
                live += len(alts)
                self.forks_used += 1
        return plans

    def on_fork(self, parent, child) -> None:
        self.parents[child.choice] = (parent.choice, len(parent.tokens))

    def run_many(self, engine: Engine, prompts: list[list[int]], max_tokens: int = 256, seed: int | None = None,
                 kind: str = "number", pattern: str | None = None, ignore_stop: bool = False,
                 stream=None) -> list[dict[str, Any]]:
        stops = frozenset() if ignore_stop else engine.tok.stop_ids
        # one wrapper per prompt: budgets and the fork tree are per request
        reqs = [Request(prompt=p, sampler=BranchingSampler(self.inner, self.cfg), max_tokens=max_tokens,
                        seed=s, stop_ids=stops, top_logprobs=max(5, self.cfg.width + 1))
                for p, s in zip(prompts, prompt_seeds(seed, len(prompts)))]
        got = _collect(engine, reqs, stream, _stream_label if stream is not None else None)
        results = []
        for r in reqs:
            per, parents = got[r.id], r.sampler.parents
            bs = []
            for c in sorted(per):
                recs = per[c]
                if c in parents:  # a fork's records start at the fork: prepend its ancestors' prefix
                    recs = _prefix(per, parents, *parents[c]) + recs
                b = _branch(c, recs, kind, pattern)
                b.parent = parents.get(c)
                if b.answer is None:  # no answer: rank below any answered path by mean margin
                    b.confidence = sum(b.margins) / max(len(b.margins), 1) * 0.5
                bs.append(b)
            res = _result(bs, aggregate=False, tokens_generated=sum(len(per[c]) for c in per))
            res["forks"] = r.sampler.forks_used
            results.append(res)
        return results

    def run(self, engine: Engine, prompt: list[int], max_tokens: int = 256, seed: int | None = None,
            stream=None, ignore_stop: bool = False, **kw: Any) -> dict[str, Any]:
        res = self.run_many(engine, [prompt], max_tokens, seed, ignore_stop=ignore_stop, **kw)[0]
        if stream is not None:
            print_branches(res, stream)
        return res


def _prefix(per, parents, choice: int, at: int) -> list[TokenRecord]:
    """Records of `choice` before index `at`, following its own fork history."""
    own = [r for r in per[choice] if r.index < at]
    if choice in parents:
        return _prefix(per, parents, *parents[choice]) + own
    return own


# -- showing results ---------------------------------------------------------------------

def _stream_label(stream, rec: TokenRecord) -> None:
    if rec.finish_reason:
        stream.write(".")
        stream.flush()


def print_branches(res: dict[str, Any], stream=sys.stdout) -> None:
    stream.write("\n")
    for b in res["branches"]:
        mark = "=>" if b["choice"] == res["choice"] else "  "
        text = " ".join(b["text"].split())
        if len(text) > 160:
            text = text[:157] + "..."
        stream.write(f"{mark} [{b['choice']:>2}] answer={b['answer']!s:<10} confidence={b['confidence']:.3f}  {text}\n")
    stream.write(f"answer: {res['answer']}\n")
    stream.flush()


def _entropix_branching(lm=None, branching_config: BranchingConfig | None = None, **kw: Any):
    inner = SAMPLERS["entropix"](lm=lm, **kw)
    return BranchingSampler(inner, branching_config or BranchingConfig())


SAMPLERS["cot"] = lambda lm=None, branches=None, aggregate=False, **kw: CotSampler(branches or 10, aggregate)
SAMPLERS["cot-agg"] = lambda lm=None, branches=None, **kw: CotSampler(branches or 10, True)
SAMPLERS["self-consistency"] = lambda lm=None, samples=None, **kw: SelfConsistency(samples or 5, **{
    k: kw.get(k) for k in ("temperature", "top_k", "top_p", "min_p")})
SAMPLERS["entropix-branching"] = _entropix_branching

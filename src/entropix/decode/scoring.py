"""Scoring decoded branches: answer confidence, max/agg path choice, majority vote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..answers import answer_span, answers_equal, extract_answer
from .records import TokenRecord


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
    follow_up: str | None = None  # "So the answer is ..." text asked of a branch without an answer

    @property
    def full_text(self) -> str:
        return self.text + (self.follow_up or "")

    def to_dict(self) -> dict[str, Any]:
        d = {"choice": self.choice, "tokens": self.tokens, "text": self.full_text, "answer": self.answer,
             "confidence": round(self.confidence, 6), "answer_tokens": self.answer_tokens,
             "finish_reason": self.finish_reason}
        if self.parent is not None:
            d["parent"] = list(self.parent)
        if self.follow_up is not None:
            d["follow_up"] = self.follow_up
        return d


def token_confidence(top_logprobs: Sequence[float]) -> float:
    """A token's confidence for pruned voting: the negative mean log-probability of the most
    likely alternatives (high where the distribution is peaked: the runners-up are unlikely)."""
    return -sum(top_logprobs) / max(len(top_logprobs), 1)


def lowest_window_confidence(confidences: Sequence[float], window: int) -> float:
    """A trace's confidence: the lowest mean token confidence over any `window` consecutive tokens
    (the whole trace when it is shorter): one stretch of doubt marks a trace as unsure."""
    n = len(confidences)
    if n == 0:
        return 0.0
    w = min(window, n)
    total = sum(confidences[:w])
    low = total
    for i in range(w, n):
        total += confidences[i] - confidences[i - w]
        low = min(low, total)
    return low / w


def answer_confidence(records: Sequence[TokenRecord], kind: str = "number", pattern: str | None = None,
                      prefix: str = "", explicit: bool = False) -> tuple[str | None, float, list[int]]:
    """(answer, confidence, answer token indices) of one decoded sequence.

    The answer span is found in prefix + the records' text; a token belongs to it when the
    characters it produced overlap the span. Only those tokens' top-1/top-2 margins count.
    The prefix (a follow-up's "So the answer is") places the answer but has no tokens.
    """
    text, bounds = prefix, []
    for r in records:
        start = len(text)
        text += r.text
        bounds.append((start, len(text)))
    span = answer_span(text, kind, pattern, explicit)
    if span is None:
        return None, 0.0, []
    a, b = span
    idx = [i for i, (s, e) in enumerate(bounds) if s < b and e > a]
    if not idx:
        return None, 0.0, []
    conf = sum(records[i].margin for i in idx) / len(idx)
    return extract_answer(text, kind, pattern, explicit), conf, idx


def branch_of(choice: int, recs: Sequence[TokenRecord], kind: str, pattern: str | None) -> Branch:
    """A finished row as a Branch. A row cut off by the token limit counts only an answer
    it marked as one: the last number of unfinished reasoning is no answer."""
    finish = recs[-1].finish_reason if recs else None
    answer, conf, idx = answer_confidence(recs, kind, pattern, explicit=finish == "length")
    return Branch(choice, [r.token for r in recs], "".join(r.text for r in recs), answer, conf, idx,
                  [r.margin for r in recs], finish)


def choose(scored: Sequence[tuple[str | None, float]], aggregate: bool,
           kind: str = "number") -> tuple[int, str | None]:
    """Index and answer chosen from (answer, confidence) pairs.

    Max path: the most confident answered branch. Agg path: the answer with the largest
    summed confidence (equal answers, "0.5" and "1/2", sum together), represented by its
    most confident branch. Ties go to the earliest.
    """
    answered = [(i, a, c) for i, (a, c) in enumerate(scored) if a is not None]
    if not answered:
        return 0, None
    if aggregate:
        groups = answer_groups([a for _, a, _ in answered], kind)
        best = max(groups, key=lambda g: (sum(answered[j][2] for j in g), -g[0]))
        answered = [answered[j] for j in best]
    i, a, _ = max(answered, key=lambda t: (t[2], -t[0]))
    return i, a


def answer_groups(answers: Sequence[str], kind: str) -> list[list[int]]:
    """Indices of equal answers, in order of first appearance."""
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        for g in groups:
            if answers_equal(answers[g[0]], a, kind):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def majority_vote(answers: Sequence[str | None], kind: str = "number") -> tuple[str | None, int, dict[str, int]]:
    """(winning answer, first index that gave it, votes per answer); equal answers
    ("72", "72.0") vote together; ties go to the earliest."""
    given = [(i, a) for i, a in enumerate(answers) if a is not None]
    if not given:
        return None, 0, {}
    texts = [a for _, a in given]
    groups = answer_groups(texts, kind)  # positions in texts, which keeps the answers' order
    best = max(groups, key=lambda g: (len(g), -g[0]))
    return texts[best[0]], given[best[0]][0], {texts[g[0]]: len(g) for g in groups}


def vote_shares(branches: Sequence[Branch], votes: dict[str, int], kind: str) -> None:
    """A sample's confidence under self-consistency: its answer's share of the vote."""
    for b in branches:
        share = max((v for a, v in votes.items() if b.answer is not None and answers_equal(a, b.answer, kind)),
                    default=0)
        b.confidence = share / max(len(branches), 1)


def result(branches: list[Branch], aggregate: bool, kind: str, tokens_generated: int) -> dict[str, Any]:
    """The decoder's answer for one prompt: every branch, the chosen one and its text."""
    i, answer = choose([(b.answer, b.confidence) for b in branches], aggregate, kind)
    return {"branches": [b.to_dict() for b in branches], "choice": i, "answer": answer,
            "text": branches[i].full_text if branches else "", "aggregate": aggregate,
            "tokens_generated": tokens_generated}

"""The floor under a task's accuracy, read off its stored rows: trivial answers that need no model
(a constant, the first or second option of a two-option question) and how a sampler's own answers
lean (truncated rows, rows with no answer, the answer it gives most)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from entropix.answers import answers_equal, normalise_number

__all__ = ["Baseline", "two_options", "same_answer", "trivial_baselines", "best_baseline", "RowStats", "row_stats"]

# "Which is larger: 9.9 or 9.11?", "... Answer yes or no.": the two options close the prompt.
_OPTIONS = re.compile(r"(\S+) or (\S+?)[?.!]?\s*$")


class Tally:
    """Counts over `by_id` (problem id -> answered correctly), for anything scored per problem."""

    by_id: dict[str, bool]

    @property
    def n(self) -> int:
        return len(self.by_id)

    @property
    def correct(self) -> int:
        return sum(self.by_id.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True)
class Baseline(Tally):
    """A rule that answers every problem the same way, and which problems it gets right."""

    name: str
    by_id: dict[str, bool]


def two_options(prompt: object) -> tuple[str, str] | None:
    """The two options at the end of a prompt ("A or B?"), or None if it does not end so."""
    m = _OPTIONS.search(str(prompt or ""))
    if m is None:
        return None
    first, second = (s.strip("\"'`*,:;()") for s in m.groups())
    return (first, second) if first and second else None


def same_answer(a: object, b: object) -> bool:
    """Whether two answers name the same thing: equal numbers ("2.50" = "2.5"), else equal text."""
    if a is None or b is None:
        return False
    x, y = str(a).strip(), str(b).strip()
    if normalise_number(x) is not None and normalise_number(y) is not None:
        return answers_equal(x, y, "number")
    return x.rstrip(".").lower() == y.rstrip(".").lower()


def _varied_options(options: Iterable[tuple[str, str] | None]) -> bool:
    """Every problem has two options, and not always the same two ("yes or no" is a constant's job)."""
    options = list(options)
    return bool(options) and all(o is not None for o in options) and len(set(options)) > 1


def trivial_baselines(problems: Mapping[str, tuple[object, object]]) -> list[Baseline]:
    """Every trivial rule that applies, over problems {id: (prompt, expected answer)}.

    Always the commonest expected answer (a constant); where every prompt ends in two options,
    also always the first and always the second option (when the options vary)."""
    if not problems:
        return []
    counts = Counter(str(gold).strip() for _, gold in problems.values() if gold is not None)
    out = []
    if counts:
        # Most frequent first; ties go to the smaller text, so the choice does not hang on row order.
        const = min(counts, key=lambda g: (-counts[g], g))
        out.append(Baseline(f"always \"{const}\"", {i: same_answer(const, g) for i, (_, g) in problems.items()}))
    options = {i: two_options(p) for i, (p, _) in problems.items()}
    if _varied_options(options.values()):
        for k, label in ((0, "first"), (1, "second")):
            by_id = {i: same_answer(options[i][k], g) for i, (_, g) in problems.items()}  # type: ignore[index]
            out.append(Baseline(f"always the {label} option", by_id))
    return out


def best_baseline(problems: Mapping[str, tuple[object, object]]) -> Baseline | None:
    """The trivial rule with the most right answers (the earlier listed on a tie), or None."""
    rules = trivial_baselines(problems)
    return max(rules, key=lambda b: b.correct) if rules else None


@dataclass(frozen=True)
class RowStats:
    """How a sampler's rows ended: at the token cap, without an answer, and its commonest answer."""

    n: int
    truncated: int | None  # None: the rows record no finish reason (multi-row samplers)
    no_answer: int
    lean: str | None  # e.g. 'the second option, 84% of option answers' or '"no", 100% of answers'


def _lean(answers: list[object], options: list[tuple[str, str] | None]) -> str | None:
    """The answer given most often, as an option position where the task has two options."""
    if _varied_options(options):
        picks = Counter(k for a, o in zip(answers, options) for k in (0, 1) if same_answer(a, o[k]))  # type: ignore[index]
        total = sum(picks.values())
        if not total:
            return None
        k, hits = max(picks.items(), key=lambda kv: (kv[1], -kv[0]))
        return f"{('first', 'second')[k]} option, {100 * hits / total:.0f}% of option answers"
    given = Counter(str(a).strip().lower() for a in answers if a not in (None, ""))
    if not given:
        return None
    top = min(given, key=lambda a: (-given[a], a))
    return f"\"{top}\", {100 * given[top] / sum(given.values()):.0f}% of answers"


def row_stats(rows: Iterable[Mapping]) -> RowStats:
    """Truncation (finish_reason "length"), no-answer count and answer lean of one sampler's rows."""
    rows = list(rows)
    reasons = [r.get("finish_reason") for r in rows]
    truncated = None if all(x is None for x in reasons) else sum(x == "length" for x in reasons)
    answers = [r.get("extracted") for r in rows]
    no_answer = sum(a is None or str(a).strip() == "" for a in answers)
    lean = _lean(answers, [two_options(r.get("prompt")) for r in rows])
    return RowStats(len(rows), truncated, no_answer, lean)

"""coinflip: does the coin still show heads after some people flip it? (graded yes / no)."""

from __future__ import annotations

import random
import re

from .problem import Problem
from .words import NAMES


def generate(rng: random.Random) -> tuple[str, str, str, dict]:
    people = rng.sample([n for n, _ in NAMES], rng.randint(2, 4))
    flips = 0
    sentences = ["A coin is heads up."]
    for person in people:
        if rng.random() < 0.5:
            flips += 1
            sentences.append(f"{person} flips the coin.")
        else:
            sentences.append(f"{person} does not flip the coin.")
    sentences.append("Is the coin still heads up?")
    expected = "yes" if flips % 2 == 0 else "no"
    return " ".join(sentences), expected, "text", {"format": "yesno", "flips": flips}


_YESNO_RE = re.compile(r"\b(yes|no)\b", re.I)


def _last_yes_no(text: str) -> str | None:
    last = None
    for last in _YESNO_RE.finditer(text):
        pass
    return last.group(1).lower() if last else None


def grade_yes_no(problem: Problem, output_text: str) -> tuple[str | None, bool]:
    """The last yes / no in the output ("format": "yesno")."""
    got = _last_yes_no(output_text)
    return got, got == problem.expected.lower()

"""The answer a prompt asks for, read from its wording: which kind of answer multi-row
decoders (CoT, self-consistency, auto) look for and score in each row's text."""

from __future__ import annotations

import re

_NUM = r"(\d*\.?\d+)"
_BIG = r"(?:larger|bigger|greater|higher)"
# Where a compare answer states its choice ("9.9 is larger", "the larger is 9.9", "9.9 > 9.11",
# "answer is 9.9"): the last number of the text is often the smaller one ("9.9 is larger than 9.11").
COMPARE_PATTERN = (
    rf"(?i)\banswer\s+is\s*:?\s*\**\s*{_NUM}"
    rf"|{_NUM}\s*\**\s*(?:is|was)\s+(?:the\s+)?{_BIG}"
    rf"|{_BIG}(?:\s+(?:number|one|value))?\s*(?:is|:|=)\s*\**\s*{_NUM}"
    rf"|{_NUM}\s*>|<\s*{_NUM}"
)

# (regex, answer kind, task format). The first match wins, so the narrower wordings (options,
# yes/no, comparisons) come before the generic number ones.
ANSWER_FORMATS = (
    (r"(?m)\(A\)[\s\S]*\(B\)|^\s*A[.)]\s[\s\S]*^\s*B[.)]\s", "option", None),  # "(A) .. (B)" or "A. .. B." lines
    (r"(?i)\byes\s*(?:or|/)\s*no\b", "pattern", "yesno"),
    (r"(?i)\bwhich\b[^?]*\b(?:larger|bigger|greater|higher)\b", "number", "compare"),
    (r"(?i)\b(?:sort|order|arrange)\b.*\b(?:smallest|largest|ascending|descending)\b", "list", None),
    (r"(?i)\b\w+ letter of\b", "text", None),
    (r"(?i)\bhow (?:many|much|long|far|old)\b|\b(?:calculate|compute|solve)\b|\bas a number\b"
     r"|\d\s*[-+*/\u00d7\u00f7^]\s*\(?\d", "number", None),
)


def kind_pattern(kind: str, fmt: str | None = None, pattern: str | None = None) -> tuple[str, str | None]:
    """The (kind, pattern) a multi-row decoder looks for, from an answer kind and a task format."""
    if fmt == "yesno":
        return "pattern", r"(?i)\b(yes|no)\b"
    if fmt == "compare":
        return "number", COMPARE_PATTERN
    if kind in ("number", "list", "option", "text", "pattern"):
        return kind, pattern
    return "number", None


def prompt_answer_format(prompt: str) -> tuple[str, str | None] | None:
    """(kind, pattern) of the answer a prompt asks for; None when it names no answer format
    (a story, an open question)."""
    for rx, kind, fmt in ANSWER_FORMATS:
        if re.search(rx, prompt):
            return kind_pattern(kind, fmt)
    return None

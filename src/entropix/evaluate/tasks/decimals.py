"""Decimal-number tasks: compare and decimals (which is larger, graded on the stated
winner) and sort (graded as a list)."""

from __future__ import annotations

import random
import re
from decimal import Decimal

from entropix.answers import answers_equal, extract_number, find_numbers, normalise_number

from .problem import Problem


def _decimal_text(rng: random.Random, integer: int, digits: int) -> str:
    if digits == 0:
        return str(integer)
    frac = rng.randint(1, 10**digits - 1)
    while frac % 10 == 0:  # no trailing zeros: "9.10" would read as a different number
        frac = rng.randint(1, 10**digits - 1)
    return f"{integer}.{frac:0{digits}d}"


def generate_compare(rng: random.Random) -> tuple[str, str, str, dict]:
    while True:
        if rng.random() < 0.6:
            # Same integer part, different decimal lengths: the "9.9 vs 9.11" trap.
            ip = rng.randint(0, 20)
            a, b = _decimal_text(rng, ip, 1), _decimal_text(rng, ip, 2)
        else:
            a = _decimal_text(rng, rng.randint(0, 99), rng.randint(0, 2))
            b = _decimal_text(rng, rng.randint(0, 99), rng.randint(1, 2))
        if Decimal(a) != Decimal(b):
            break
    if rng.random() < 0.5:
        a, b = b, a
    larger = a if Decimal(a) > Decimal(b) else b
    cands = [normalise_number(a), normalise_number(b)]
    return f"Which is larger: {a} or {b}?", normalise_number(larger), "number", {"format": "compare", "candidates": cands}


def generate_sort(rng: random.Random) -> tuple[str, str, str, dict]:
    count = rng.randint(3, 6)
    bases = rng.sample(range(0, 21), rng.randint(1, 3))
    nums: list[str] = []
    while len(nums) < count:
        t = _decimal_text(rng, rng.choice(bases), rng.choice([0, 1, 1, 2, 2]))
        if all(Decimal(t) != Decimal(x) for x in nums):
            nums.append(t)
    ordered = sorted(nums, key=Decimal)
    for _ in range(10):  # an already-sorted list would test nothing
        rng.shuffle(nums)
        if nums != ordered:
            break
    expected = ",".join(normalise_number(x) for x in ordered)
    prompt = f"Sort these numbers from smallest to largest: {', '.join(nums)}"
    return prompt, expected, "list", {"numbers": list(nums), "count": count}


def generate_decimals(rng: random.Random) -> tuple[str, str, str, dict]:
    """Only the trap: same integer part, and the number with fewer decimals is larger
    although its decimals, read as an integer, are smaller (9.9 vs 9.11)."""
    ip = rng.randint(0, 30)
    while True:
        short_digits = rng.choice([1, 1, 2])
        long_digits = short_digits + rng.choice([1, 1, 2])
        a, b = _decimal_text(rng, ip, short_digits), _decimal_text(rng, ip, long_digits)
        if Decimal(a) > Decimal(b) and int(a.split(".")[1]) < int(b.split(".")[1]):
            break
    if rng.random() < 0.5:
        first, second = a, b
    else:
        first, second = b, a
    cands = [normalise_number(first), normalise_number(second)]
    prompt = f"Which is larger: {first} or {second}?"
    # strict: only a stated winner counts, not the last number mentioned (a coin toss here).
    return prompt, normalise_number(a), "number", {"format": "compare", "candidates": cands, "strict": True}


_BIGGER = r"(?:larger|bigger|greater|higher)"
_THAN_RE = re.compile(
    rf"\**\s*(?:is|was)\b(?:[^.\n?!]|\.(?=\d)){{0,40}}?\b(?:(?P<big>{_BIGGER})|smaller|less|lower)\s+than\s+\**\s*"
    r"(?P<other>[-+]?(?:\d+(?:\.\d+)?|\.\d+))",
    re.I,
)
_BARE_NUMBER_RE = re.compile(r"[\s*_`\"']*([-+]?(?:\d+(?:\.\d+)?|\.\d+))[\s*_`\"'.!]*")


def _than_winner(after: str, value: str, candidates: list[str]) -> str | None:
    """ "X is (about 1.5 times) larger than Y" -> X; "X is ... less than Y" -> Y; only when Y is
    the other candidate, so "1.5 times" and the like are never taken for one."""
    m = _THAN_RE.match(after)
    if not m:
        return None
    other = normalise_number(m.group("other"))
    if other is None or answers_equal(other, value) or not any(answers_equal(other, c) for c in candidates):
        return None
    return value if m.group("big") else other


def _called_larger(before: str, after: str) -> bool:
    """Whether the text around a number calls it the larger one ("9.9 is larger", "larger: 9.9", "9.9 >")."""
    return bool(
        re.match(rf"\**\s*(?:is|was)\s+(?:the\s+)?{_BIGGER}\b", after, re.I)
        or re.match(r"\s*>", after)
        or re.search(rf"\b{_BIGGER}(?:\s+(?:number|one|value))?\s*(?:is|:|=)\s*\**\s*$", before, re.I)
        or re.search(r"<\s*$", before)
    )


def _compare_answer(text: str, candidates: list[str], strict: bool = False) -> str | None:
    """Which candidate the output calls larger ("9.9 is larger", "larger is 9.9", "9.9 > 9.11").

    strict: a bare reply or a stated winner only; no falling back on the last mention."""
    if strict:
        bare = _BARE_NUMBER_RE.fullmatch(text)  # the reply is just the number ("9.9.", "**9.9**")
        if bare:
            return normalise_number(bare.group(1))
    stated = extract_number(text, last_number=False)
    if stated is not None:
        return stated
    winners: list[tuple[int, str]] = []
    mentions: list[str] = []
    for value, start, end in find_numbers(text):
        if not any(answers_equal(value, c) for c in candidates):
            continue
        mentions.append(value)
        before, after = text[max(0, start - 60) : start], text[end : end + 80]
        if (claimed := _than_winner(after, value, candidates)) is not None:
            winners.append((start, claimed))
        elif _called_larger(before, after):
            winners.append((start, value))
    if winners:
        return winners[-1][1]
    if strict:
        return None
    if mentions:
        return mentions[-1]
    return extract_number(text)


def grade_compare(problem: Problem, output_text: str) -> tuple[str | None, bool]:
    """The candidate the output calls larger ("format": "compare")."""
    got = _compare_answer(output_text, problem.extra.get("candidates", []), bool(problem.extra.get("strict")))
    return got, answers_equal(got, problem.expected, "number")

"""carries: additions where nearly every column carries (graded on the problem's own sum)."""

from __future__ import annotations

import random
import re

from entropix.answers import answers_equal, extract_number, find_numbers

from .problem import Problem


def _carry_operand_digits(rng: random.Random, width: int) -> tuple[list[int], list[int]]:
    """Digit columns (least significant first) where nearly every column carries."""
    a, b, carry = [], [], 0
    for col in range(width):
        lead = col == width - 1
        for _attempt in range(50):
            x, y = rng.randint(1 if lead else 0, 9), rng.randint(1 if lead else 0, 9)
            # Most columns must carry: that is where a small model drops a digit.
            if (x + y + carry >= 10) == (rng.random() < 0.85 or col == 0):
                break
        a.append(x)
        b.append(y)
        carry = (x + y + carry) // 10
    return a, b


def generate(rng: random.Random) -> tuple[str, str, str, dict]:
    while True:
        # Two to four digits: the embedded model drops carries even on two (88 + 62 = 142).
        da, db = _carry_operand_digits(rng, rng.choice([2, 2, 3, 3, 4]))
        if rng.random() < 0.3:  # an operand one digit shorter: the columns no longer line up by eye
            db = db[:-1]
            db[-1] = db[-1] or rng.randint(1, 9)  # no leading zero
        a = int("".join(map(str, reversed(da))))
        b = int("".join(map(str, reversed(db))))
        carries, carry = 0, 0
        for col in range(len(da)):
            carry = (a // 10**col % 10 + b // 10**col % 10 + carry) // 10
            carries += carry
        if carries >= 2:
            break
    if rng.random() < 0.5:
        a, b = b, a
    extra = {"format": "sum", "operands": [a, b], "carries": carries}
    return f"What is {a} + {b}?", str(a + b), "number", extra


def _sum_answer(text: str, operands: list[int]) -> str | None:
    """An answer phrase, else the result of the last "A + B = X" (or "is X") on the
    problem's own operands, else the last number."""
    stated = extract_number(text, last_number=False)
    if stated is not None or len(operands) != 2:
        return stated if stated is not None else extract_number(text)
    a, b = (re.escape(str(x)) for x in operands)
    equation = re.compile(rf"(?<![\d.,])(?:{a}\s*\+\s*{b}|{b}\s*\+\s*{a})\s*\)?\s*,?\s*(?:which\s+)?"
                          r"(?:=|is\b|equals\b|gives(?:\s+us)?\b|makes\b)\s*")
    results = [m.end() for m in equation.finditer(text)]
    for start in reversed(results):
        nums = find_numbers(text[start : start + 40])
        if nums and nums[0][1] == 0:  # the number must follow the "=" directly
            return nums[0][0]
    return extract_number(text)


def grade_sum(problem: Problem, output_text: str) -> tuple[str | None, bool]:
    """The sum the output states ("format": "sum")."""
    got = _sum_answer(output_text, problem.extra.get("operands", []))
    return got, answers_equal(got, problem.expected, "number")

"""The task registry: names -> generators, deterministic problem lists, prompts and grading."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from entropix.answers import answers_equal, extract_answer, extract_list, extract_option

from . import arithmetic, carries, coinflip, decimals, letters
from .gsm8k import load_gsm8k, load_gsm8k_hub
from .problem import Problem, TaskError

Generator = Callable[[random.Random], tuple[str, str, str, dict]]
Grader = Callable[[Problem, str], tuple["str | None", bool]]

_GENERATORS: dict[str, Generator] = {
    "arithmetic": arithmetic.generate,
    "coinflip": coinflip.generate,
    "letters": letters.generate_letters,
    "compare": decimals.generate_compare,
    "sort": decimals.generate_sort,
    "carries": carries.generate,
    "position": letters.generate_position,
    "decimals": decimals.generate_decimals,
}

# Graders for the answer formats a task asks for in problem.extra["format"]; the rest are
# graded by kind (number, text, list, option).
_GRADERS: dict[str, Grader] = {
    "yesno": coinflip.grade_yes_no,
    "sum": carries.grade_sum,
    "letter": letters.grade_letter,
    "compare": decimals.grade_compare,
}


def _generate(name: str, n: int, seed: int) -> list[Problem]:
    if not isinstance(n, int) or n < 0:
        raise TaskError(f"n must be a non-negative integer, got {n!r}")
    gen = _GENERATORS[name]
    seen: set[str] = set()
    out = []
    for i in range(n):
        # One RNG per item (string seeds are hashed stably), so the first k problems
        # do not depend on n.
        rng = random.Random(f"{name}:{seed}:{i}")
        for _attempt in range(25):
            prompt, expected, kind, extra = gen(rng)
            if prompt not in seen:
                break
        seen.add(prompt)
        out.append(Problem(id=f"{name}-{seed}-{i}", prompt=prompt, expected=expected, kind=kind, extra=extra))
    return out


def _registered(name: str) -> Callable[[int, int], list[Problem]]:
    def make(n: int, seed: int = 0) -> list[Problem]:
        return _generate(name, n, seed)

    make.__name__ = f"make_{name}"
    make.__doc__ = f"n deterministic {name!r} problems for a seed."
    return make


TASKS: dict[str, Callable[[int, int], list[Problem]]] = {name: _registered(name) for name in _GENERATORS}
KNOWN_TASKS = tuple(sorted([*TASKS, "gsm8k"]))


def _unknown(name: str) -> TaskError:
    return TaskError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")


def make_task(name: str, n: int, seed: int = 0) -> list[Problem]:
    """n synthetic problems of a task; the same (name, n, seed) always gives the same list."""
    if name not in TASKS:
        raise _unknown(name)
    return TASKS[name](n, seed)


def load_task(name: str, n: int | None = None, seed: int = 0, data: str | Path | None = None) -> list[Problem]:
    """Problems for any task: synthetic ones (n defaults to 100) or gsm8k (first n rows).

    gsm8k reads data (a JSONL path) when given, else the Hub's test split.
    """
    if name == "gsm8k":
        return load_gsm8k(data, limit=n) if data is not None else load_gsm8k_hub("test", limit=n)
    if name not in TASKS:
        raise _unknown(name)
    if data is not None:
        raise TaskError(f"task {name!r} is synthetic and takes no data file")
    return make_task(name, 100 if n is None else n, seed)


def format_prompt(problem: Problem) -> str:
    """The user message for a problem: the bare question, with no "think step by step"
    (CoT decoding should find reasoning paths without being asked); an answer-format
    hint only where grading needs one."""
    text = problem.prompt.strip()
    if problem.extra.get("format") == "yesno" and "yes or no" not in text.lower():
        text += " Answer yes or no."
    options = problem.extra.get("options")
    if problem.kind == "option" and isinstance(options, dict):
        text += "\n" + "\n".join(f"({k}) {v}" for k, v in options.items())
    return text


def is_correct(problem: Problem, output_text: str | None) -> tuple[str | None, bool]:
    """(extracted answer, whether it matches problem.expected)."""
    if not output_text:
        return None, False
    grader = _GRADERS.get(problem.extra.get("format"))
    if grader is not None:
        return grader(problem, output_text)
    options = problem.extra.get("options")
    if problem.kind == "list":
        length = problem.extra.get("count") or len(problem.expected.split(","))
        got = extract_list(output_text, length=length)
    elif problem.kind == "option" and isinstance(options, dict) and options:
        got = extract_option(output_text, "".join(options))
    else:
        got = extract_answer(output_text, problem.kind, problem.extra.get("pattern"))
    return got, answers_equal(got, problem.expected, problem.kind)

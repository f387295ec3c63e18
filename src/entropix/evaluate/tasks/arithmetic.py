"""arithmetic: bracketed expressions and short word problems (graded as numbers)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .words import ITEMS, NAMES


@dataclass
class _Expr:
    text: str
    value: int
    prec: int  # 1: + -, 2: * /, 3: a single number


def _combine(left: _Expr, op: str, right: _Expr) -> _Expr:
    p = 1 if op in "+-" else 2
    lt = left.text if left.prec >= p else f"({left.text})"
    # The right operand needs brackets unless it binds tighter, or the operator is
    # associative (+, *) and it has the same precedence.
    rt = right.text if right.prec > p or (right.prec == p and op in "+*") else f"({right.text})"
    if op == "+":
        v = left.value + right.value
    elif op == "-":
        v = left.value - right.value
    elif op == "*":
        v = left.value * right.value
    else:
        v = left.value // right.value
    return _Expr(f"{lt} {op} {rt}", v, p)


def _expression_step(rng: random.Random, cur: _Expr) -> _Expr | None:
    """One more operation on cur (None: this draw did not fit)."""
    op = rng.choice("++--**/")
    if op == "/":
        divisors = [d for d in range(2, 13) if cur.value % d == 0 and cur.value != 0]
        if not divisors:
            return None
        return _combine(cur, "/", _Expr(str(d := rng.choice(divisors)), d, 3))
    m = rng.randint(2, 9) if op == "*" else rng.randint(1, 12)
    atom = _Expr(str(m), m, 3)
    return _combine(cur, op, atom) if rng.random() < 0.7 else _combine(atom, op, cur)


def _expression_problem(rng: random.Random) -> tuple[str, int, str]:
    first = rng.randint(1, 12)
    cur = _Expr(str(first), first, 3)
    for _ in range(rng.randint(2, 4)):
        for _attempt in range(30):
            nxt = _expression_step(rng, cur)
            if nxt is not None and abs(nxt.value) <= 500:
                cur = nxt
                break
    return f"Compute {cur.text}.", cur.value, cur.text


def _wrap(expr: str) -> str:
    return f"({expr})" if " " in expr else expr


def _word_step(rng: random.Random, he: str, his: str, item: str, v: int, expr: str, left: int):
    """(sentence, value, expression, operations used) for one drawn step, or None if it does not fit."""
    step = rng.choice(["add", "sub", "mul", "div", "packs"])
    if step == "add":
        n = rng.randint(2, 15)
        return f"{he.capitalize()} buys {n} more {item}.", v + n, f"{expr} + {n}", 1
    if step == "sub" and v >= 3:
        n = rng.randint(2, v - 1)
        return f"{he.capitalize()} gives {n} {item} to a friend.", v - n, f"{expr} - {n}", 1
    if step == "mul" and v <= 60:
        k = rng.choice([2, 3])
        word = {2: "doubles", 3: "triples"}[k]
        return f"Then {he} {word} the number of {item} {he} has.", v * k, f"{_wrap(expr)} * {k}", 1
    if step == "div" and any(v % k == 0 for k in (2, 3, 4)):
        k = rng.choice([k for k in (2, 3, 4) if v % k == 0])
        sentence = f"{he.capitalize()} splits {his} {item} equally into {k} bags and keeps only one bag."
        return sentence, v // k, f"{_wrap(expr)} / {k}", 1
    if step == "packs" and left >= 2:
        k, m = rng.randint(2, 5), rng.randint(2, 6)
        return f"{he.capitalize()} buys {k} packs with {m} {item} in each pack.", v + k * m, f"{expr} + {k} * {m}", 2
    return None


def _word_problem(rng: random.Random) -> tuple[str, int, str]:
    name, he = rng.choice(NAMES)
    his = "her" if he == "she" else "his"
    item = rng.choice(ITEMS)
    v = rng.randint(5, 20)
    expr = str(v)
    sentences = [f"{name} has {v} {item}."]
    ops, target = 0, rng.randint(2, 4)
    while ops < target:
        step = _word_step(rng, he, his, item, v, expr, target - ops)
        if step is not None:
            sentence, v, expr, used = step
            sentences.append(sentence)
            ops += used
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), v, expr


def generate(rng: random.Random) -> tuple[str, str, str, dict]:
    maker = _expression_problem if rng.random() < 0.5 else _word_problem
    prompt, value, expr = maker(rng)
    return prompt, str(value), "number", {"expression": expr}

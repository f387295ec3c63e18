"""Evaluation problems: GSM8K loading, deterministic synthetic tasks, prompting and grading."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable

from entropix import EntropixError
from entropix.evaluate.jsonl import json_objects
from entropix.answers import (
    answers_equal,
    extract_answer,
    extract_list,
    extract_number,
    extract_option,
    find_numbers,
    normalise_number,
)

__all__ = [
    "Problem",
    "TASKS",
    "TaskError",
    "HubUnavailable",
    "format_prompt",
    "is_correct",
    "load_gsm8k",
    "load_gsm8k_hub",
    "load_task",
    "make_task",
]


class TaskError(EntropixError, ValueError):
    """Bad task name, arguments or data file (one-line message)."""


class HubUnavailable(EntropixError, RuntimeError):
    """The Hugging Face Hub cannot be used (library missing or offline)."""


@dataclass(frozen=True)
class Problem:
    """One evaluation item; expected is already normalised for its kind."""

    id: str
    prompt: str
    expected: str
    kind: str = "number"
    # Excluded from hashing so that problems stay usable as dict keys.
    extra: dict = field(default_factory=dict, hash=False)


# ------------------------------------------------------------------------------ GSM8K


def _gsm8k_problem(row: dict, index: int, where: str) -> Problem:
    for key in ("question", "answer"):
        if key not in row:
            raise TaskError(f"{where}: missing field {key!r}")
        if not isinstance(row[key], str):
            raise TaskError(f"{where}: field {key!r} must be a string")
    solution, sep, final = row["answer"].rpartition("####")
    if not sep:
        raise TaskError(f"{where}: answer has no '#### N' final line")
    expected = normalise_number(final.strip())
    if expected is None:
        raise TaskError(f"{where}: final answer {final.strip()!r} is not a number")
    extra = {k: v for k, v in row.items() if k not in ("id", "question", "answer")}
    extra["solution"] = solution.strip()  # the worked rationale, useful for few-shot prompts
    pid = str(row["id"]) if row.get("id") is not None else f"gsm8k-{index}"
    return Problem(id=pid, prompt=row["question"].strip(), expected=expected, kind="number", extra=extra)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise TaskError(f"limit must be a non-negative integer, got {limit!r}")


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Read GSM8K-style JSONL ({"question", "answer" ending in "#### N"}) into problems."""
    _check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"GSM8K file not found: {path}")
    problems: list[Problem] = []
    for where, index, row in json_objects(path, TaskError):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_gsm8k_problem(row, index, where))
    return problems


def load_gsm8k_hub(split: str = "test", limit: int | None = None) -> list[Problem]:
    """Load GSM8K ("main" config) from the Hugging Face Hub; HubUnavailable when it cannot."""
    _check_limit(limit)
    try:
        import datasets  # type: ignore
    except ImportError:
        datasets = None
    rows = None
    if datasets is not None:
        try:
            rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        except Exception as e:  # offline, unknown split, ... all mean "cannot use the Hub"
            raise HubUnavailable(f"could not load GSM8K from the Hub ({type(e).__name__}: {e}); pass a local JSONL file") from None
    else:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise HubUnavailable(
                "loading GSM8K from the Hub needs the `datasets` or `huggingface_hub` package; pass a local JSONL file"
            ) from None
        try:
            import pyarrow.parquet as pq  # type: ignore
        except ImportError:
            raise HubUnavailable("reading the Hub's GSM8K parquet files needs `pyarrow` (or install `datasets`); pass a local JSONL file") from None
        try:
            local = hf_hub_download("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", repo_type="dataset")
            rows = pq.read_table(local).to_pylist()
        except Exception as e:
            raise HubUnavailable(f"could not load GSM8K from the Hub ({type(e).__name__}: {e}); pass a local JSONL file") from None
    problems = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        problems.append(_gsm8k_problem(dict(row), i, f"gsm8k {split} row {i}"))
    return problems


# ------------------------------------------------------------------------- arithmetic

_NAMES = [
    ("Alice", "she"), ("Bob", "he"), ("Carla", "she"), ("Daniel", "he"), ("Emma", "she"),
    ("Farid", "he"), ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Kate", "she"), ("Liam", "he"), ("Maria", "she"), ("Noah", "he"), ("Olga", "she"),
    ("Pedro", "he"), ("Quinn", "she"), ("Ravi", "he"), ("Sara", "she"), ("Tom", "he"),
    ("Uma", "she"), ("Victor", "he"), ("Wen", "she"), ("Yusuf", "he"), ("Zoe", "she"),
]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "cards", "stamps", "shells", "books", "coins"]


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


def _expression_problem(rng: random.Random) -> tuple[str, int, str]:
    first = rng.randint(1, 12)
    cur = _Expr(str(first), first, 3)
    for _ in range(rng.randint(2, 4)):
        for _attempt in range(30):
            op = rng.choice("++--**/")
            if op == "/":
                divisors = [d for d in range(2, 13) if cur.value % d == 0 and cur.value != 0]
                if not divisors:
                    continue
                nxt = _combine(cur, "/", _Expr(str(d := rng.choice(divisors)), d, 3))
            else:
                m = rng.randint(2, 9) if op == "*" else rng.randint(1, 12)
                atom = _Expr(str(m), m, 3)
                nxt = _combine(cur, op, atom) if rng.random() < 0.7 else _combine(atom, op, cur)
            if abs(nxt.value) <= 500:
                cur = nxt
                break
    return f"Compute {cur.text}.", cur.value, cur.text


def _wrap(expr: str) -> str:
    return f"({expr})" if " " in expr else expr


def _word_problem(rng: random.Random) -> tuple[str, int, str]:
    name, he = rng.choice(_NAMES)
    his = "her" if he == "she" else "his"
    item = rng.choice(_ITEMS)
    v = rng.randint(5, 20)
    expr = str(v)
    sentences = [f"{name} has {v} {item}."]
    ops, target = 0, rng.randint(2, 4)
    while ops < target:
        step = rng.choice(["add", "sub", "mul", "div", "packs"])
        if step == "add":
            n = rng.randint(2, 15)
            sentences.append(f"{he.capitalize()} buys {n} more {item}.")
            v, expr, ops = v + n, f"{expr} + {n}", ops + 1
        elif step == "sub" and v >= 3:
            n = rng.randint(2, v - 1)
            sentences.append(f"{he.capitalize()} gives {n} {item} to a friend.")
            v, expr, ops = v - n, f"{expr} - {n}", ops + 1
        elif step == "mul" and v <= 60:
            k = rng.choice([2, 3])
            word = {2: "doubles", 3: "triples"}[k]
            sentences.append(f"Then {he} {word} the number of {item} {he} has.")
            v, expr, ops = v * k, f"{_wrap(expr)} * {k}", ops + 1
        elif step == "div" and any(v % k == 0 for k in (2, 3, 4)):
            k = rng.choice([k for k in (2, 3, 4) if v % k == 0])
            sentences.append(f"{he.capitalize()} splits {his} {item} equally into {k} bags and keeps only one bag.")
            v, expr, ops = v // k, f"{_wrap(expr)} / {k}", ops + 1
        elif step == "packs" and target - ops >= 2:
            k, m = rng.randint(2, 5), rng.randint(2, 6)
            sentences.append(f"{he.capitalize()} buys {k} packs with {m} {item} in each pack.")
            v, expr, ops = v + k * m, f"{expr} + {k} * {m}", ops + 2
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), v, expr


def _arithmetic(rng: random.Random) -> tuple[str, str, str, dict]:
    maker = _expression_problem if rng.random() < 0.5 else _word_problem
    prompt, value, expr = maker(rng)
    return prompt, str(value), "number", {"expression": expr}


# --------------------------------------------------------------------------- coinflip


def _coinflip(rng: random.Random) -> tuple[str, str, str, dict]:
    people = rng.sample([n for n, _ in _NAMES], rng.randint(2, 4))
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


# ---------------------------------------------------------------------------- letters

WORDS = """
strawberry banana mississippi committee bookkeeper balloon coffee letter apple address
accommodate assessment necessary possession success tomorrow embarrass millennium occurrence
parallel programming raspberry blueberry cherry pepper puppy happiness butterfly grammar summer
hello google yellow pizza giraffe elephant umbrella cinnamon broccoli spaghetti potato tomato
avocado chocolate vanilla caramel marshmallow peppermint watermelon pineapple mango orange
lemon coconut zucchini cucumber carrot lettuce cabbage onion garlic mushroom pumpkin squirrel
rabbit kangaroo hippopotamus alligator crocodile penguin flamingo dolphin octopus jellyfish
mosquito caterpillar grasshopper woodpecker chimpanzee cheetah panther gorilla buffalo
antelope library computer keyboard internet telephone television calendar dictionary
encyclopedia newspaper magazine notebook pencil eraser scissors stapler envelope paragraph
sentence question answer mountain volcano waterfall river ocean island desert forest
valley canyon glacier thunder lightning rainbow tornado hurricane blizzard weather season
autumn winter spring january february september november december saturday wednesday
thursday morning afternoon evening midnight breakfast dinner dessert sandwich hamburger
spoon kitchen bedroom bathroom window ceiling staircase furniture mirror blanket pillow
bottle basket bucket hammer engineer teacher doctor nurse farmer banker lawyer soldier
student professor musician guitar violin trumpet piano drummer orchestra symphony concert
theater cinema museum gallery stadium airport harbor station village kingdom castle
bridge tunnel highway traffic bicycle motorcycle airplane helicopter submarine rocket
satellite planet galaxy universe element molecule electron bubble puzzle riddle mystery
adventure treasure pirate parrot dragon unicorn wizard goblin freedom courage kindness
balance rhythm syllable vowel consonant alphabet language assistant tennessee referee
""".split()

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _letters(rng: random.Random) -> tuple[str, str, str, dict]:
    word = rng.choice(WORDS)
    r = rng.random()
    if r < 0.15:
        letter = rng.choice([c for c in _ALPHABET if c not in word])
    elif r < 0.45:
        # The most repeated letter is where models miscount most.
        top = max(word.count(c) for c in set(word))
        letter = rng.choice(sorted(c for c in set(word) if word.count(c) == top))
    else:
        letter = rng.choice(sorted(set(word)))
    prompt = f"How many times does the letter {letter} appear in the word {word}?"
    return prompt, str(word.count(letter)), "number", {"word": word, "letter": letter}


# ---------------------------------------------------------------------- compare, sort


def _decimal_text(rng: random.Random, integer: int, digits: int) -> str:
    if digits == 0:
        return str(integer)
    frac = rng.randint(1, 10**digits - 1)
    while frac % 10 == 0:  # no trailing zeros: "9.10" would read as a different number
        frac = rng.randint(1, 10**digits - 1)
    return f"{integer}.{frac:0{digits}d}"


def _compare(rng: random.Random) -> tuple[str, str, str, dict]:
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


def _sort(rng: random.Random) -> tuple[str, str, str, dict]:
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


# ------------------------------------------------- carries, position, decimals (traps)


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


def _carries(rng: random.Random) -> tuple[str, str, str, dict]:
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


_ORDINAL_WORDS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth",
                  7: "seventh", 8: "eighth", 9: "ninth", 10: "tenth"}


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _position(rng: random.Random) -> tuple[str, str, str, dict]:
    word = rng.choice([w for w in WORDS if len(w) >= 5])
    # Not the first letter (trivial); up to the tenth, which ordinal words still cover.
    k = rng.randint(2, min(len(word), 10))
    nth = _ordinal(k) if rng.random() < 0.5 else _ORDINAL_WORDS[k]
    prompt = f"What is the {nth} letter of the word {word}?"
    return prompt, word[k - 1], "text", {"format": "letter", "word": word, "index": k}


def _decimals(rng: random.Random) -> tuple[str, str, str, dict]:
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


# ---------------------------------------------------------------------------- registry

_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str, dict]]] = {
    "arithmetic": _arithmetic,
    "coinflip": _coinflip,
    "letters": _letters,
    "compare": _compare,
    "sort": _sort,
    "carries": _carries,
    "position": _position,
    "decimals": _decimals,
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


# ---------------------------------------------------------------------- prompt, grade


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


_YESNO_RE = re.compile(r"\b(yes|no)\b", re.I)
_BIGGER = r"(?:larger|bigger|greater|higher)"
_THAN_RE = re.compile(
    rf"\**\s*(?:is|was)\b(?:[^.\n?!]|\.(?=\d)){{0,40}}?\b(?:(?P<big>{_BIGGER})|smaller|less|lower)\s+than\s+\**\s*"
    r"(?P<other>[-+]?(?:\d+(?:\.\d+)?|\.\d+))",
    re.I,
)


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


def _last_yes_no(text: str) -> str | None:
    last = None
    for last in _YESNO_RE.finditer(text):
        pass
    return last.group(1).lower() if last else None


_BARE_NUMBER_RE = re.compile(r"[\s*_`\"']*([-+]?(?:\d+(?:\.\d+)?|\.\d+))[\s*_`\"'.!]*")


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
        elif (
            re.match(rf"\**\s*(?:is|was)\s+(?:the\s+)?{_BIGGER}\b", after, re.I)
            or re.match(r"\s*>", after)
            or re.search(rf"\b{_BIGGER}(?:\s+(?:number|one|value))?\s*(?:is|:|=)\s*\**\s*$", before, re.I)
            or re.search(r"<\s*$", before)
        ):
            winners.append((start, value))
    if winners:
        return winners[-1][1]
    if strict:
        return None
    if mentions:
        return mentions[-1]
    return extract_number(text)


# A single letter, quoted or bold ("n", 'N', **n**, (n)), or bare at a clause's end ("is n.").
_ONE_LETTER = (
    r"(?<!\w)(?P<q>[\"'“‘*_`(\[]+)?(?P<c>[A-Za-z])"
    r"(?(q)[\"'”’*_`)\]]+|(?=\s*(?:$|[.,;:!?)\n])))"
)
_LETTER_PHRASE_RE = re.compile(
    r"\b(?:letters?|answer)\b[^\n.?!]{0,80}?(?:\b(?:is|was|would\s+be)\b|[:=])\s*"
    r"(?:the\s+letter\s+)?" + _ONE_LETTER,
    re.I,
)
_QUOTED_LETTER_RE = re.compile(_ONE_LETTER)


def _letter_answer(text: str) -> str | None:
    """The letter an output names: the last "letter ... is X" / "answer: X", else a reply
    that is just one letter, else the quoted single letter if only one is quoted
    ("a combination of the letters "N" and "E"" names none)."""
    phrases = list(_LETTER_PHRASE_RE.finditer(text))
    if phrases:
        return phrases[-1].group("c").lower()
    whole = _QUOTED_LETTER_RE.fullmatch(text.strip().rstrip("."))
    if whole:
        return whole.group("c").lower()
    quoted = {m.group("c").lower() for m in _QUOTED_LETTER_RE.finditer(text) if m.group("q")}
    return quoted.pop() if len(quoted) == 1 else None


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


def is_correct(problem: Problem, output_text: str | None) -> tuple[str | None, bool]:
    """(extracted answer, whether it matches problem.expected)."""
    if not output_text:
        return None, False
    fmt = problem.extra.get("format")
    if fmt == "yesno":
        got = _last_yes_no(output_text)
        return got, got == problem.expected.lower()
    if fmt == "sum":
        got = _sum_answer(output_text, problem.extra.get("operands", []))
        return got, answers_equal(got, problem.expected, "number")
    if fmt == "letter":
        got = _letter_answer(output_text)
        return got, got == problem.expected.lower()
    if fmt == "compare":
        got = _compare_answer(output_text, problem.extra.get("candidates", []), bool(problem.extra.get("strict")))
        return got, answers_equal(got, problem.expected, "number")
    options = problem.extra.get("options")
    if problem.kind == "list":
        length = problem.extra.get("count") or len(problem.expected.split(","))
        got = extract_list(output_text, length=length)
    elif problem.kind == "option" and isinstance(options, dict) and options:
        got = extract_option(output_text, "".join(options))
    else:
        got = extract_answer(output_text, problem.kind, problem.extra.get("pattern"))
    return got, answers_equal(got, problem.expected, problem.kind)

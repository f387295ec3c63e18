"""Evaluation tasks: GSM8K loading, synthetic generators, prompts and grading."""

import ast
import json
import operator
import re
import sys
from fractions import Fraction

import pytest

from entropix.evaluate.tasks import (
    TASKS,
    HubUnavailable,
    Problem,
    format_prompt,
    is_correct,
    load_gsm8k,
    load_gsm8k_hub,
    load_task,
    make_task,
)

SYNTHETIC = ["arithmetic", "coinflip", "letters", "compare", "sort", "carries", "position", "decimals"]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr: str) -> Fraction:
    """Evaluate + - * / over integer literals exactly; anything else is rejected."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"unsupported syntax: {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


def solve_story(prompt: str) -> Fraction:
    """Interpret the word-problem sentences one by one."""
    value = None
    for sentence in re.split(r"(?<=[.?])\s+", prompt):
        if m := re.search(r" has (\d+) \w+\.$", sentence):
            value = Fraction(int(m.group(1)))
        elif m := re.search(r"buys (\d+) packs with (\d+) \w+ in each pack", sentence):
            value += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"buys (\d+) more", sentence):
            value += int(m.group(1))
        elif m := re.search(r"gives (\d+) \w+ to a friend", sentence):
            value -= int(m.group(1))
        elif "doubles" in sentence:
            value *= 2
        elif "triples" in sentence:
            value *= 3
        elif m := re.search(r"equally into (\d+) bags and keeps only one bag", sentence):
            value /= int(m.group(1))
        else:
            assert sentence.startswith("How many"), sentence
    return value


def count_ops(expr: str) -> int:
    return sum(isinstance(n, ast.BinOp) for n in ast.walk(ast.parse(expr, mode="eval")))


def test_safe_eval_helper():
    assert safe_eval("(3 + 4) * 2 - 5") == 9
    assert safe_eval("12 / 4 - 1") == 2
    with pytest.raises(ValueError):
        safe_eval("__import__('os')")


# --------------------------------------------------------------------------- registry


def test_registry_and_unknown_task():
    assert set(SYNTHETIC) <= set(TASKS)
    with pytest.raises(ValueError, match="known tasks: .*arithmetic.*gsm8k"):
        make_task("nope", 3, 0)
    with pytest.raises(ValueError, match="known tasks"):
        load_task("nope", 3, 0)
    with pytest.raises(ValueError):
        make_task("arithmetic", -1, 0)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_deterministic(name):
    a = make_task(name, 40, seed=7)
    b = make_task(name, 40, seed=7)
    assert a == b
    assert len(a) == 40
    assert [p.id for p in a] == [f"{name}-7-{i}" for i in range(40)]
    assert len({p.id for p in a}) == 40
    # A different seed gives a different set, and the first k problems do not depend on n.
    assert [p.prompt for p in make_task(name, 40, seed=8)] != [p.prompt for p in a]
    assert make_task(name, 10, seed=7) == a[:10]
    assert load_task(name, 40, 7) == a
    for p in a:
        assert isinstance(p, Problem)
        assert p.prompt and p.expected
        hash(p)  # usable as a dict key despite the extra dict


def test_arithmetic_answers_are_right():
    problems = make_task("arithmetic", 200, seed=1)
    styles = set()
    for p in problems:
        assert p.kind == "number"
        expr = p.extra["expression"]
        if p.prompt.startswith("Compute "):
            styles.add("expression")
            assert p.prompt.endswith(".")
            assert p.prompt[len("Compute ") : -1] == expr
        else:
            styles.add("word")
            assert p.prompt.endswith("have now?")
            # Re-solve the story on its own, not through the stored expression.
            assert solve_story(p.prompt) == Fraction(p.expected), p.prompt
        assert 2 <= count_ops(expr) <= 4, expr
        value = safe_eval(expr)
        assert value.denominator == 1, expr
        assert abs(float(value) - float(p.expected)) < 1e-9, (expr, p.expected)
        assert re.fullmatch(r"-?\d+", p.expected)
    assert styles == {"expression", "word"}


def test_coinflip_answers_are_right():
    for p in make_task("coinflip", 100, seed=2):
        assert p.kind == "text"
        assert p.prompt.startswith("A coin is heads up.")
        flips = p.prompt.count(" flips the coin.")
        assert flips == p.extra["flips"]
        assert p.expected == ("yes" if flips % 2 == 0 else "no")
        assert format_prompt(p).endswith("Answer yes or no.")


def test_letters_answers_are_right():
    problems = make_task("letters", 200, seed=3)
    counts = set()
    for p in problems:
        m = re.fullmatch(r"How many times does the letter ([a-z]) appear in the word ([a-z]+)\?", p.prompt)
        assert m, p.prompt
        letter, word = m.groups()
        assert p.expected == str(word.count(letter))
        counts.add(word.count(letter))
    assert 0 in counts and max(counts) >= 3


def test_letters_word_list():
    from entropix.evaluate.tasks import WORDS

    assert len(set(WORDS)) >= 150
    assert "strawberry" in WORDS
    assert all(w.isalpha() and w.islower() for w in WORDS)


def test_compare_answers_are_right():
    for p in make_task("compare", 100, seed=4):
        m = re.fullmatch(r"Which is larger: ([\d.]+) or ([\d.]+)\?", p.prompt)
        assert m, p.prompt
        a, b = float(m.group(1)), float(m.group(2))
        assert a != b
        assert abs(float(p.expected) - max(a, b)) < 1e-9


def test_sort_answers_are_right():
    for p in make_task("sort", 100, seed=5):
        assert p.kind == "list"
        head, _, tail = p.prompt.partition(": ")
        assert head == "Sort these numbers from smallest to largest"
        nums = [float(x) for x in tail.split(", ")]
        got = [float(x) for x in p.expected.split(",")]
        assert got == sorted(nums)
        assert len(set(nums)) == len(nums) >= 3


def column_carries(a: int, b: int) -> int:
    """Carries of a + b by schoolbook columns, on the digit strings."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry = count = 0
    for i in range(max(len(xs), len(ys))):
        carry = (int(xs[i]) if i < len(xs) else 0) + (int(ys[i]) if i < len(ys) else 0) + carry >= 10
        count += carry
    return count


def test_carries_answers_are_right():
    widths = set()
    for p in make_task("carries", 200, seed=11):
        m = re.fullmatch(r"What is ([1-9]\d*) \+ ([1-9]\d*)\?", p.prompt)
        assert m, p.prompt
        a, b = int(m.group(1)), int(m.group(2))
        assert p.kind == "number" and p.expected == str(a + b)
        assert p.extra["operands"] == [a, b]
        assert column_carries(a, b) == p.extra["carries"] >= 2, p.prompt
        widths.add(max(len(m.group(1)), len(m.group(2))))
    assert widths == {2, 3, 4}


ORDINALS = {w: i for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth".split(), start=1)}


def test_position_answers_are_right():
    styles = set()
    for p in make_task("position", 200, seed=12):
        m = re.fullmatch(r"What is the (\w+) letter of the word ([a-z]+)\?", p.prompt)
        assert m, p.prompt
        nth, word = m.groups()
        if nth in ORDINALS:
            k = ORDINALS[nth]
            styles.add("word")
        else:
            k = int(re.fullmatch(r"(\d+)(?:st|nd|rd|th)", nth).group(1))
            assert nth == {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")
            styles.add("digits")
        assert 2 <= k <= len(word)
        assert p.kind == "text" and p.expected == word[k - 1]
        assert format_prompt(p) == p.prompt
    assert styles == {"word", "digits"}


def test_decimals_are_all_traps():
    larger_first = 0
    for p in make_task("decimals", 200, seed=13):
        m = re.fullmatch(r"Which is larger: (\d+)\.(\d+) or (\d+)\.(\d+)\?", p.prompt)
        assert m, p.prompt
        ia, fa, ib, fb = m.groups()
        assert ia == ib
        a, b = float(f"{ia}.{fa}"), float(f"{ib}.{fb}")
        big, small = (fa, fb) if a > b else (fb, fa)
        # The larger number has fewer decimals, and its decimals read as a smaller integer.
        assert len(big) < len(small) and int(big) < int(small), p.prompt
        assert not big.endswith("0") and not small.endswith("0")
        assert float(p.expected) == max(a, b)
        larger_first += a > b
    assert 60 < larger_first < 140  # the larger one is not always on the same side


# ----------------------------------------------------------------------------- GSM8K


def test_load_gsm8k_file(gsm8k_path, gsm8k_rows):
    # gsm8k_path holds GSM8K-shaped rows made by the fixture; each row's "value" was computed
    # when the problem was written, so the parsed answers are checked against arithmetic, not text.
    problems = load_gsm8k(gsm8k_path)
    assert len(problems) == len(gsm8k_rows)
    first = problems[0]
    assert first.id == "gsm8k-0"
    assert first.expected == str(gsm8k_rows[0]["value"])
    assert first.prompt == gsm8k_rows[0]["question"]
    assert first.kind == "number"
    assert "solution" in first.extra and "####" not in first.extra["solution"]
    assert first.extra["solution"] == gsm8k_rows[0]["answer"].rsplit("####", 1)[0].strip()
    for p, row in zip(problems, gsm8k_rows):
        assert p.expected == str(row["value"]), (p.id, row["answer"])
    # finals such as "#### 1,080" lose their thousands separator
    with_commas = [row for row in gsm8k_rows if "," in row["answer"].rsplit("####", 1)[1]]
    assert with_commas
    assert {str(row["value"]) for row in with_commas} <= {p.expected for p in problems}
    assert not any("," in p.expected for p in problems)
    assert len({p.id for p in problems}) == len(problems)
    assert load_gsm8k(gsm8k_path, limit=5) == problems[:5]
    assert load_task("gsm8k", 3, data=gsm8k_path) == problems[:3]


def test_load_gsm8k_ids_and_extra(tmp_path):
    f = tmp_path / "g.jsonl"
    rows = [
        {"id": "q1", "question": "Q?", "answer": "a\n#### $1,234.50", "level": 2},
        {"question": "R?", "answer": "#### -7"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b = load_gsm8k(f)
    assert (a.id, a.expected, a.extra["level"]) == ("q1", "1234.5", 2)
    assert (b.id, b.expected) == ("gsm8k-1", "-7")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "Q", "answer": "#### 1"}\n{not json}\n', r":2: invalid JSON"),
        ('{"answer": "#### 1"}\n', r":1: missing field 'question'"),
        ('{"question": "Q"}\n', r":1: missing field 'answer'"),
        ('{"question": "Q", "answer": "no marker"}\n', r":1: .*####"),
        ('{"question": "Q", "answer": "#### lots"}\n', r":1: .*not a number"),
        ("[1, 2]\n", r":1: expected a JSON object"),
    ],
)
def test_load_gsm8k_bad_files(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_gsm8k(f)
    assert "\n" not in str(info.value)


def test_load_gsm8k_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_gsm8k(tmp_path / "absent.jsonl")


def test_load_gsm8k_hub_without_libraries(monkeypatch):
    # None in sys.modules makes the import fail, as if the packages were absent.
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(RuntimeError, match="datasets"):
        load_gsm8k_hub("test", limit=2)
    with pytest.raises(HubUnavailable):
        load_task("gsm8k", 2)


def test_synthetic_task_rejects_data(tmp_path):
    with pytest.raises(ValueError, match="synthetic"):
        load_task("letters", 2, 0, data=tmp_path / "x.jsonl")


# ---------------------------------------------------------------------- prompt, grade


def test_format_prompt_has_no_cot_instruction():
    for name in SYNTHETIC:
        for p in make_task(name, 5, 0):
            text = format_prompt(p)
            assert text.startswith(p.prompt)
            assert "step by step" not in text.lower()
            if name != "coinflip":
                assert text == p.prompt


def test_format_prompt_gsm8k(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "  How many?  ", "answer": "#### 3"}) + "\n")
    gsm = load_gsm8k(f)[0]
    assert format_prompt(gsm) == "How many?"


def test_format_prompt_lists_options():
    p = Problem("m1", "Pick one.", "B", "option", {"options": {"A": "red", "B": "blue"}})
    assert format_prompt(p) == "Pick one.\n(A) red\n(B) blue"
    assert is_correct(p, "The answer is (B).") == ("B", True)
    # Letters come from the problem's own options, beyond the default A-E.
    q = Problem("m2", "Pick one.", "F", "option", {"options": {c: c for c in "ABCDEF"}})
    assert is_correct(q, "I choose (F)") == ("F", True)


def test_is_correct_number():
    p = Problem("x", "Compute 3 + 4.", "7")
    assert is_correct(p, "3 + 4 = 7") == ("7", True)
    assert is_correct(p, "The answer is 7.0, not 8") == ("7", True)
    assert is_correct(p, "It is 8") == ("8", False)
    assert is_correct(p, "") == (None, False)
    assert is_correct(p, "no idea") == (None, False)


def test_is_correct_coinflip():
    p = make_task("coinflip", 1, 0)[0]
    right, wrong = p.expected, ("no" if p.expected == "yes" else "yes")
    assert is_correct(p, f"Let me count the flips... {right.capitalize()}.") == (right, True)
    assert is_correct(p, f"Yes or no? No wait. {wrong}") == (wrong, False)
    assert is_correct(p, "The coin shows heads.") == (None, False)


def test_is_correct_compare():
    p = Problem("c", "Which is larger: 9.9 or 9.11?", "9.9", "number", {"format": "compare", "candidates": ["9.9", "9.11"]})
    assert is_correct(p, "9.9 is larger than 9.11.")[1]
    assert is_correct(p, "Comparing 9.11 and 9.9, the larger number is 9.9.")[1]
    assert is_correct(p, "9.9 > 9.11")[1]
    assert is_correct(p, "9.11 < 9.9")[1]
    assert is_correct(p, "The answer is 9.9")[1]
    assert is_correct(p, "9.11 is bigger than 9.9") == ("9.11", False)
    assert is_correct(p, "9.9") == ("9.9", True)
    # "X is <anything> larger/less than Y" with Y the other candidate (real greedy phrasings).
    assert is_correct(p, "9.9 is approximately 1.49 times larger than 9.11.") == ("9.9", True)
    assert is_correct(p, "9.11 is approximately 1.31 inches larger than 9.9.") == ("9.11", False)
    assert is_correct(p, "9.11 is approximately 1.45 grams less than 9.9.") == ("9.9", True)
    assert is_correct(p, "9.9 is smaller than 9.11") == ("9.11", False)
    # "than" something else is no comparison of the two: the last mention, as before.
    assert is_correct(p, "9.11 is larger than 5, and so is 9.9") == ("9.11", False)


def test_is_correct_list_and_letters():
    p = Problem("s", "Sort these numbers from smallest to largest: 9.11, 9.9, 3.5", "3.5,9.11,9.9", "list", {"count": 3})
    assert is_correct(p, "We have 9.11, 9.9, 3.5. Sorted: 3.5, 9.11, 9.9. That took 2 steps.") == ("3.5,9.11,9.9", True)
    assert is_correct(p, "3.5, 9.9, 9.11")[1] is False
    q = make_task("letters", 1, 0)[0]
    assert is_correct(q, f"It appears {q.expected} times.") == (q.expected, True)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_expected_answers_grade_themselves(name):
    # A model that just states the expected answer must be graded correct.
    for p in make_task(name, 30, 9):
        text = p.expected.replace(",", ", ") if p.kind == "list" else p.expected
        got, ok = is_correct(p, f"The answer is {text}.")
        assert ok, (p, got)


def _carries_problem(a: int, b: int) -> Problem:
    return Problem("s", f"What is {a} + {b}?", str(a + b), "number", {"format": "sum", "operands": [a, b]})


def test_is_correct_carries():
    p = _carries_problem(752, 578)
    assert is_correct(p, "752 + 578 = 1330") == ("1330", True)
    assert is_correct(p, "The sum of 752 and 578 is 1,330.") == ("1330", True)
    # The equation on the problem's operands wins over numbers that come later.
    assert is_correct(p, "752 + 578 = 1330.\n\nThis uses 2 carries.") == ("1330", True)
    assert is_correct(p, "So 578 + 752 is 1330, a number with 4 digits") == ("1330", True)
    # Real greedy output (for 58 + 64): the claim is 122, not the operand mentioned last.
    q = _carries_problem(58, 64)
    text = "We need to perform the operation of 58 + 64, which is 122. This is a simple way to calculate 58 + 64, using addition."
    assert is_correct(q, text) == ("122", True)
    # An answer phrase wins over everything (real greedy output, wrong).
    text = "First, we can add the numbers: 752 + 578 = 223.\n\nSo, 752 + 578 = 1220.\n\nThe answer is 1220."
    assert is_correct(p, text) == ("1220", False)
    q = _carries_problem(97837, 18494)
    assert is_correct(q, "(97837 + 18494) = 116331, a big number of 6 digits") == ("116331", True)
    assert is_correct(q, "I am not sure.") == (None, False)


def _position_problem(word: str, k: int) -> Problem:
    return Problem("p", f"What is the {k}th letter of the word {word}?", word[k - 1], "text",
                   {"format": "letter", "word": word, "index": k})


@pytest.mark.parametrize("text, got", [
    ('The fifth letter of the word window is "L".', "l"),  # real greedy output
    ('The fifth letter of the word "window" is "o".', "o"),
    ("The fifth letter of window is O.", "o"),
    ("The fifth letter is **o**.", "o"),
    ("W-I-N-D-O-W. Counting: w, i, n, d, o. So the fifth letter is the letter o, as in 'own'.", "o"),
    ("The answer: o", "o"),
    ("o", "o"),
    ("**O**.", "o"),
    ("The fifth letter of window is a consonant: d.", "d"),
    ("The fifth letter of the word window is a.", "a"),
    ('Spelled out, the letter "o" comes after "d"; "o" it is.', None),  # two letters quoted, no claim
    ('The fifth letter of the word window is a combination of the letters "N" and "O".', None),  # real
    ('The word window ends in a letter that is often confused with "o".', "o"),  # one letter quoted
    ("The fifth letter of the word window is a combination of letters.", None),
    ("I do not know.", None),
])
def test_is_correct_position(text, got):
    p = _position_problem("window", 5)
    assert is_correct(p, text) == (got, got == "o")


def test_is_correct_decimals_is_strict():
    p = make_task("decimals", 1, 0)[0]
    small = next(c for c in p.extra["candidates"] if c != p.expected)
    assert is_correct(p, f"{p.expected} is larger than {small}.") == (p.expected, True)
    assert is_correct(p, f"The larger number is {small}.") == (small, False)
    assert is_correct(p, f"{small} < {p.expected}")[1]
    assert is_correct(p, p.expected) == (p.expected, True)
    assert is_correct(p, f"**{p.expected}**.") == (p.expected, True)
    # "X is smaller" names no winner in strict grading; it must not read as "X".
    assert is_correct(p, f"{small} is smaller.") == (None, False)
    # A mention is no claim: the plain compare task would read the last one.
    assert is_correct(p, f"{small} is approximately 1.31 inches away from {p.expected}.") == (None, False)
    loose = Problem("c", p.prompt, p.expected, "number", {"format": "compare", "candidates": p.extra["candidates"]})
    assert is_correct(loose, f"{small} is approximately 1.31 inches away from {p.expected}.")[1]

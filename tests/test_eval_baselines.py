"""Trivial baselines and row statistics on constructed rows."""

import pytest

from entropix.evaluate.baselines import best_baseline, row_stats, same_answer, trivial_baselines, two_options


def test_two_options_reads_the_closing_pair():
    assert two_options("Which is larger: 9.9 or 9.11?") == ("9.9", "9.11")
    assert two_options("Which is larger: 16.5 or 16.25?  ") == ("16.5", "16.25")
    assert two_options("Is the coin still heads up? Answer yes or no.") == ("yes", "no")
    assert two_options("How many times does the letter b appear in the word alphabet?") is None
    assert two_options("Cats or dogs? Tell me why.") is None  # the options must close the prompt
    assert two_options(None) is None


def test_same_answer():
    assert same_answer("2.50", "2.5") and same_answer("9.9", "9.90")
    assert not same_answer("9.9", "9.11")
    assert same_answer("No", "no") and same_answer("yes.", "yes")
    assert not same_answer(None, "1") and not same_answer("1", None)


def decimals_problems():
    """Six two-option problems: the larger number is second in four, first in two; gold '3' twice."""
    pairs = [("1.2", "3"), ("0.5", "0.7"), ("2.25", "2.3"), ("3", "1.5"), ("4.1", "4.15"), ("3", "2.9")]
    return {f"p{i}": (f"Which is larger: {a} or {b}?", max(a, b, key=float)) for i, (a, b) in enumerate(pairs)}


def test_trivial_baselines_on_two_option_rows():
    rules = {b.name: b for b in trivial_baselines(decimals_problems())}
    assert set(rules) == {'always "3"', "always the first option", "always the second option"}
    assert (rules['always "3"'].correct, rules['always "3"'].n) == (3, 6)  # p0's gold is "3" too
    assert rules["always the first option"].correct == 2
    assert rules["always the second option"].correct == 4
    assert rules["always the second option"].accuracy == pytest.approx(4 / 6)
    assert rules["always the second option"].by_id == {"p0": True, "p1": True, "p2": True, "p3": False,
                                                       "p4": True, "p5": False}
    best = best_baseline(decimals_problems())
    assert best is not None and best.name == "always the second option"


def test_constant_baseline_and_fixed_options():
    # yes/no is the same pair everywhere: a constant covers it, no option rule is added.
    probs = {f"c{i}": ("Is the coin still heads up? Answer yes or no.", g) for i, g in enumerate("yyny")}
    probs = {k: (p, {"y": "yes", "n": "no"}[g]) for k, (p, g) in probs.items()}
    rules = trivial_baselines(probs)
    assert [(b.name, b.correct) for b in rules] == [('always "yes"', 3)]
    # A tie between constants goes to the smaller text, whatever the row order.
    tie = {"a": ("q", "2"), "b": ("q", "1")}
    assert best_baseline(tie).name == 'always "1"'
    assert best_baseline({}) is None


def test_constant_wins_ties_with_options():
    # The constant "2" and always-second both get 1 of 2: the first listed (the constant) is reported.
    probs = {"a": ("Which is larger: 1 or 2?", "2"), "b": ("Which is larger: 5 or 4?", "5")}
    assert [b.correct for b in trivial_baselines(probs)] == [1, 1, 1]
    assert best_baseline(probs).name == 'always "2"'


def test_row_stats_truncation_no_answer_and_lean():
    rows = [
        {"prompt": "Which is larger: 1.2 or 1.25?", "extracted": "1.25", "finish_reason": "stop"},
        {"prompt": "Which is larger: 3.5 or 3.45?", "extracted": "3.45", "finish_reason": "length"},
        {"prompt": "Which is larger: 7 or 7.1?", "extracted": None, "finish_reason": "length"},
        {"prompt": "Which is larger: 2.9 or 2.11?", "extracted": "2.9", "finish_reason": "stop"},
    ]
    st = row_stats(rows)
    assert (st.n, st.truncated, st.no_answer) == (4, 2, 1)
    assert st.lean == "second option, 67% of option answers"
    # Rows without a finish reason (several decodes per row) have no truncation count.
    multi = row_stats([{"prompt": "q", "extracted": "no"}, {"prompt": "q", "extracted": "No", "finish_reason": None},
                       {"prompt": "q", "extracted": "yes"}, {"prompt": "q", "extracted": ""}])
    assert (multi.truncated, multi.no_answer) == (None, 1)
    assert multi.lean == '"no", 67% of answers'
    assert row_stats([{"prompt": "q", "extracted": None}]).lean is None

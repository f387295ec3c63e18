"""Answer extraction, spans and normalisation."""

import time

import pytest

from entropix.answers import (
    answer_span,
    answers_equal,
    extract_answer,
    extract_list,
    extract_number,
    extract_option,
    extract_pattern,
    find_numbers,
    normalise_number,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("72", "72"),
        ("72.0", "72"),
        ("72.00", "72"),
        ("$72", "72"),
        ("72 sheep", "72"),
        ("72 sheep.", "72"),
        ("+72", "72"),
        ("72%", "72"),
        ("1,000", "1000"),
        ("1,234,567.50", "1234567.5"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("-3", "-3"),
        ("\u22123", "-3"),
        ("-0.0", "0"),
        ("100", "100"),
        ("3/4", "3/4"),
        (r"\frac{1}{2}", "1/2"),
        (r"\dfrac{3}{4}", "3/4"),
        ("$18$", "18"),
        (r"1\,234", "1234"),
        (r"5 \text{ apples}", "5"),
        ("  42  ", "42"),
        ("abc", None),
        ("", None),
        (None, None),
        ("1 2", None),
        ("1,0000", None),
        ("3 hours and 5 minutes", None),
        ("1/0", None),
    ],
)
def test_normalise_number(raw, expected):
    assert normalise_number(raw) == expected


def test_normalisation_equivalences():
    forms = ["72", "72.0", "$72", "72 sheep", "72.00", "+72"]
    assert {normalise_number(f) for f in forms} == {"72"}
    for a in forms:
        for b in forms:
            assert answers_equal(a, b)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("48/2 = 24 clips in May.\n48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("so #### -5\nthen some junk 99", "-5"),
        (r"Thus the result is \boxed{42}. Check: 6 * 7 = 42, 43", "42"),
        (r"\boxed{1} first, final \boxed{\frac{1}{2}}", "1/2"),
        (r"\boxed{x = 5} and 7", "5"),
        (r"Total: \boxed{\$1{,}200}", "1200"),
        ("The answer is 18.", "18"),
        ("The answer is $18$. I counted 3 times.", "18"),
        ("Answer: 7\nDouble-check 3 + 4 = 7, so 10 items.", "7"),
        ("The final answer is: **42**\nCheck: 3 + 4", "42"),
        ("My answer:\n\n 12 apples", "12"),
        ("She pays $72 in total.", "72"),
        ("There are 72 sheep", "72"),
        ("The temperature is -3 degrees.", "-3"),
        ("It costs 3.50", "3.5"),
        ("That is 72% of them.", "72"),
        ("She uses 3/4 of the cake", "3/4"),
        ("In 2023 she earned 1,234,567 dollars", "1234567"),
        ("10-3 = 7", "7"),
        ("Compute 5 + 3 = 8. So 8.", "8"),
        ("x2 is a label, answer 0.25.", "0.25"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected
    assert extract_answer(text, "number") == expected


def test_extract_number_without_last_number_fallback():
    assert extract_number("I think 5 then 6", last_number=False) is None
    assert extract_number("The answer is 5, not 6", last_number=False) == "5"


def test_marker_beats_boxed_and_phrase():
    text = r"The answer is 3. \boxed{4}" + "\n#### 5"
    assert extract_number(text) == "5"
    assert extract_number(r"The answer is 3. \boxed{4}") == "4"


def test_find_numbers_spans():
    text = "Pay $1,200 then -3 and 0.5; 10-4"
    found = find_numbers(text)
    assert [v for v, _, _ in found] == ["1200", "-3", "0.5", "10", "4"]
    for v, s, e in found:
        assert normalise_number(text[s:e]) == v


@pytest.mark.parametrize(
    "text",
    [
        "#### 1,234",
        "Natalia sold 48/2 = 24 clips.\n#### 72",
        r"so \boxed{\frac{1}{2}} done",
        r"pre 9 \boxed{x = 5} and 7",
        "The answer is 18. Then 19 more.",
        "It was 72% of 100 people, 3.50 each",
        "The temperature is -3",
        "twelve 12 twelve",
    ],
)
def test_number_span_matches_extraction(text):
    value = extract_number(text)
    start, end = answer_span(text, "number")
    assert 0 <= start < end <= len(text)
    assert normalise_number(text[start:end]) == value


def test_number_span_picks_the_chosen_occurrence():
    text = "7 apples, then 7 more. The answer is 7. Check: 7"
    start, end = answer_span(text)
    assert text[start:end] == "7"
    # The phrase occurrence, not the first or the last "7".
    assert start == text.index("answer is 7") + len("answer is ")


def test_span_none_when_nothing_found():
    assert answer_span("nothing here") is None
    assert answer_span("", "option") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", "B"),
        ("I pick B) because of the reasoning", "B"),
        ("The answer is B", "B"),
        ("Answer: b", "B"),
        ("the answer is c.", "C"),
        ("The answer is (D) since", "D"),
        ("The answer is A because it fits.", "A"),
        ("The answer is a bit unclear; maybe C", "C"),
        ("Options: (A) 1 (B) 2 (C) 3. The answer is (B).", "B"),
        ("A coin is here. So D", "D"),
        ("I think it's E", "E"),
        ("It is F", None),
        ("no letter here", None),
    ],
)
def test_extract_option(text, expected):
    assert extract_option(text) == expected
    span = answer_span(text, "option")
    if expected is None:
        assert span is None
    else:
        assert text[span[0] : span[1]].upper() == expected


def test_extract_option_custom_letters():
    assert extract_option("The answer is F", options="ABCDEF") == "F"
    assert extract_option("(Z)", options="XYZ") == "Z"


def test_extract_pattern():
    text = "Result: 5\nResult: 9 units"
    assert extract_pattern(text, r"Result: (\d+)") == "9"
    assert extract_pattern(text, r"Result: \d+") == "Result: 9"
    assert extract_pattern(text, r"Score: (\d+)") is None
    with pytest.raises(ValueError):
        extract_pattern(text, "(")


def test_pattern_with_kind_normalises_and_spans():
    text = "Total: $1,200 dollars. Total: $3,400 dollars."
    assert extract_answer(text, "number", pattern=r"Total: (\S+)") == "3400"
    start, end = answer_span(text, "number", pattern=r"Total: (\S+)")
    assert text[start:end] == "3,400"
    assert extract_answer(text, "pattern", pattern=r"Total: (\S+)") == "$3,400"


def test_extract_text():
    text = "Let me think.\nParis.\n\n"
    assert extract_answer(text, "text") == "paris"
    start, end = answer_span(text, "text")
    assert text[start:end] == "Paris"
    assert extract_answer("  The Capital is PARIS...  ", "text") == "the capital is paris"
    assert extract_answer("\n \n", "text") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.2, 3.4, 9.11", "1.2,3.4,9.11"),
        ("Sorted: 3.50, 9.11, 9.9.", "3.5,9.11,9.9"),
        ("Input 9.11, 9.9, 3.5. So 3.5 < 9.9 < 9.11 wait. That is 3 numbers.", "3.5,9.9,9.11"),
        ("The answer is [1, 2, 3] and more 4, 5", "1,2,3"),
        ("1.2, 3.4, and 9.11", "1.2,3.4,9.11"),
        ("just 7", "7"),
        ("nothing", None),
    ],
)
def test_extract_list(text, expected):
    assert extract_answer(text, "list") == expected
    span = answer_span(text, "list")
    if expected is not None:
        assert extract_answer(text[span[0] : span[1]], "list") == expected


def test_extract_list_prefers_given_length():
    text = "From 9.11, 9.9, 3.5 we get 3.5 < 9.11 < 9.9? No. Steps taken: 1, 2"
    assert extract_list(text) == "1,2"
    assert extract_list(text, length=3) == "3.5,9.11,9.9"


def test_unknown_kind():
    with pytest.raises(ValueError, match="known kinds"):
        extract_answer("5", "colour")


def test_answers_equal():
    assert answers_equal("72", "72.0")
    assert answers_equal("1,000", "1000")
    assert answers_equal("0.5", "1/2")
    assert answers_equal("1", "1.0000001")
    assert not answers_equal("1", "1.0001")
    assert not answers_equal("72", "27")
    assert not answers_equal(None, "72")
    assert not answers_equal("72", None)
    assert answers_equal("3.5,9.11,9.9", "3.50, 9.11, 9.90", "list")
    assert not answers_equal("3.5,9.9,9.11", "3.5,9.11,9.9", "list")
    assert not answers_equal("1,2", "1,2,3", "list")
    assert answers_equal("(b)", "B", "option")
    assert answers_equal("Yes.", "yes", "text")
    assert not answers_equal("yes", "no", "text")
    # Non-numbers fall back to text comparison instead of failing.
    assert answers_equal("seven", "Seven", "number")


@pytest.mark.parametrize("text", ["answer is " * 5000, "\\boxed{" * 5000, "1, " * 5000, "(A) " * 5000])
def test_pathological_inputs_stay_fast(text):
    # Model outputs can loop; extraction must stay roughly linear in their length.
    start = time.perf_counter()
    for kind in ("number", "option", "text", "list"):
        extract_answer(text, kind)
        answer_span(text, kind)
    assert time.perf_counter() - start < 5.0

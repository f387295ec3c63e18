"""Answer extraction and normalisation.

Shared by the evaluation harness (grading model outputs) and by chain-of-thought
decoding, which needs the character span of the answer to score the tokens that
form it.  Every extractor has a span twin that returns the same occurrence.
"""

from __future__ import annotations

import itertools
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Iterator, NamedTuple

__all__ = [
    "KINDS",
    "answer_span",
    "answers_equal",
    "extract_answer",
    "extract_list",
    "extract_number",
    "extract_option",
    "extract_pattern",
    "find_numbers",
    "normalise_number",
]

KINDS = ("number", "option", "text", "list", "pattern")


class _Hit(NamedTuple):
    value: str
    start: int
    end: int


# --------------------------------------------------------------------------- numbers

# Integer part: thousands-grouped ("1,234"), plain digits, or nothing before ".5".
# The (?!\d) stops "1,2345" from being read as a grouped number.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))"
# A fraction denominator must not be followed by another "/d" (dates like 1/2/2020).
_NUM_CORE = rf"[-+\u2212]?{_INT}(?:\.\d+)?(?:/\d+(?![\d/]))?"
# Not glued to a word or a decimal point: "x2", "v1.2.3" and "10-3" (minus) are
# not numbers starting there.
_NUM_RE = re.compile(rf"(?<![\w.]){_NUM_CORE}")

_NORM_RE = re.compile(
    r"(?P<sign>[-+\u2212]?)\s*(?:[€£¥]|USD)?\s*"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?P<dec>\.\d+)?"
    r"(?:\s*/\s*(?P<den>\d+))?(?P<rest>.*)",
    re.S,
)
# What may follow a number that is still "just that number": a percent sign and/or
# unit words ("72 sheep", "5 km/h"); anything holding another digit is not one number.
_UNIT_TAIL_RE = re.compile(r"%?(?:\s*[^\W\d_]+(?:[\s'/\-]+[^\W\d_]+)*)?")

_LATEX_SUBS = [
    (re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}"), r"\1/\2"),
    (re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)"), r"\1/\2"),  # \frac12
    (re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}"), r" \1"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\[,!;: ]"), ""),  # thin spaces, often used as thousands separators
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\\$|\$"), ""),  # currency and inline-math delimiters alike
    (re.compile(r"\\[()\[\]]|\\(?:left|right)\b"), ""),
]


def _clean_latex(s: str) -> str:
    for rx, repl in _LATEX_SUBS:
        s = rx.sub(repl, s)
    return s


def _fmt_decimal(d: Decimal) -> str:
    s = format(d.normalize(), "f")
    return "0" if s == "-0" else s


def normalise_number(s: object) -> str | None:
    """Canonical string for a number written as text, or None if it is not one.

    "72", "72.0", "$72", "72 sheep", "+72", "72%" -> "72"; "1,000" -> "1000";
    "0.50" -> "0.5"; fractions stay fractions ("3/4", "\\frac{1}{2}" -> "1/2").
    """
    if s is None:
        return None
    t = _clean_latex(str(s)).strip().strip("*_`\"'").strip()
    m = _NORM_RE.fullmatch(t)
    if not m:
        return None
    rest = m.group("rest").strip().rstrip(".,;:!?)]*_").strip()
    if rest and not _UNIT_TAIL_RE.fullmatch(rest):
        return None
    try:
        d = Decimal(m.group("int").replace(",", "") + (m.group("dec") or ""))
    except InvalidOperation:  # pragma: no cover - the regex only admits digits
        return None
    if m.group("sign") in ("-", "\u2212"):
        d = -d
    out = _fmt_decimal(d)
    den = m.group("den")
    if den is not None:
        if int(den) == 0:
            return None
        out = f"{out}/{int(den)}"
    return out


def _to_fraction(canonical: str) -> Fraction:
    num, _, den = canonical.partition("/")
    value = Fraction(Decimal(num))
    return value / int(den) if den else value


def find_numbers(text: str) -> list[tuple[str, int, int]]:
    """Every number in text as (normalised value, start, end), in order."""
    out = []
    for m in _NUM_RE.finditer(text or ""):
        v = normalise_number(m.group())
        if v is not None:
            out.append((v, m.start(), m.end()))
    return out


def _first_number(text: str, start: int, end: int) -> _Hit | None:
    nums = find_numbers(text[start:end])
    if not nums:
        return None
    v, s, e = nums[0]
    return _Hit(v, start + s, start + e)


def _last_number(text: str, start: int, end: int) -> _Hit | None:
    nums = find_numbers(text[start:end])
    if not nums:
        return None
    v, s, e = nums[-1]
    return _Hit(v, start + s, start + e)


# ------------------------------------------------------------ structured answer regions

_MARKER_RE = re.compile(r"####[ \t]*")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE_RE = re.compile(
    r"\banswers?\b[*_\s]*(?:is\b|was\b|=|:|equals\b|would\s+be\b|will\s+be\b|should\s+be\b)"
    r"[*_\s:]*",
    re.I,
)


# An answer follows its phrase closely; the cap keeps text full of phrases linear.
_REGION_CHARS = 200


def _line_region(text: str, start: int) -> tuple[int, int]:
    """From start (skipping blank space, line breaks included) to that line's end."""
    i = start
    while i < len(text) and text[i].isspace() and i - start < _REGION_CHARS:
        i += 1
    end = text.find("\n", i, i + _REGION_CHARS)
    return i, min(len(text), i + _REGION_CHARS) if end < 0 else end


def _marker_region(text: str) -> tuple[int, int] | None:
    last = None
    for last in _MARKER_RE.finditer(text):
        pass
    if last is None:
        return None
    end = text.find("\n", last.end())
    return last.end(), len(text) if end < 0 else end


def _boxed_region(text: str) -> tuple[int, int] | None:
    """Content span of the last \\boxed{...} whose braces balance."""
    opens = [m.end() for m in _BOXED_RE.finditer(text)]
    if not opens:
        return None
    # Match all braces in one pass, so that many unclosed boxes stay linear.
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    for start in reversed(opens):
        end = close.get(start - 1)
        if end is not None:
            return start, end
    return None


def _phrase_regions(text: str) -> Iterator[tuple[int, int]]:
    """Regions after "the answer is" / "answer:" phrases, last phrase first."""
    for m in reversed(list(_PHRASE_RE.finditer(text))):
        yield _line_region(text, m.end())


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _number_hit(text: str, last_number: bool = True) -> _Hit | None:
    region = _marker_region(text)
    if region:
        hit = _first_number(text, *region)
        if hit:
            return hit
    region = _boxed_region(text)
    if region:
        s, e = _strip_span(text, *region)
        v = normalise_number(text[s:e])
        if v is not None:  # e.g. \frac{1}{2}, which no plain number match covers
            return _Hit(v, s, e)
        hit = _last_number(text, s, e)
        if hit:
            return hit
    for region in _phrase_regions(text):
        hit = _first_number(text, *region)
        if hit:
            return hit
    return _last_number(text, 0, len(text)) if last_number else None


def extract_number(text: str | None, last_number: bool = True) -> str | None:
    """The final numeric answer in text, normalised.

    Priority: a "#### N" marker, the last \\boxed{...}, an "the answer is X" or
    "answer: X" phrase, then (if last_number) the last number anywhere.
    """
    hit = _number_hit(text or "", last_number)
    return hit.value if hit else None


# --------------------------------------------------------------------------- options


def _option_hit(text: str, options: str = "ABCDE", explicit: bool = False) -> _Hit | None:
    letters = "".join(dict.fromkeys("".join(options).upper()))
    if not letters:
        raise ValueError("options must name at least one letter")
    cls = "[" + re.escape(letters) + re.escape(letters.lower()) + "]"
    upper = "[" + re.escape(letters) + "]"

    # 1. An answer phrase: "answer is B", "Answer: b", "answer is (C)".
    phrase = re.compile(
        r"\banswer\b[*_\s]*(?:is\b|was\b|:|=|would\s+be\b|should\s+be\b)[*_\s:]*"
        rf"(?:(?:option|choice)\s+)?[(\[]?({cls})(?!\w)",
        re.I,
    )
    for m in reversed(list(phrase.finditer(text))):
        i = m.start(1)
        # A lowercase letter followed by more words is an article ("is a bit"), not a choice.
        if text[i].islower() and not re.match(r"[)\]]?\s*(?:$|[.,:;!?*\n])", text[i + 1 :]):
            continue
        return _Hit(text[i].upper(), i, i + 1)
    if explicit:  # only an answer phrase marks the choice
        return None

    # 2. A marked capital letter: "(B)" or "B)".
    last = None
    for last in re.finditer(rf"\(({upper})\)|(?<![\w(])({upper})\)", text):
        pass
    if last is not None:
        g = 1 if last.group(1) else 2
        return _Hit(last.group(g), last.start(g), last.end(g))

    # 3. The last standalone capital option letter, skipping the words "A" and "I".
    for m in reversed(list(re.finditer(rf"(?<![\w'])({upper})(?![\w'])", text))):
        if m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end() :]):
            continue
        return _Hit(m.group(1), m.start(1), m.end(1))
    return None


def extract_option(text: str | None, options: str = "ABCDE") -> str | None:
    """The chosen option letter (upper case) from "(B)", "B)", "answer is B", or a bare letter."""
    hit = _option_hit(text or "", options)
    return hit.value if hit else None


# --------------------------------------------------------------------------- pattern


def _pattern_hit(text: str, pattern: str | re.Pattern) -> _Hit | None:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid answer pattern {pattern!r}: {e}") from None
    last = None
    for last in rx.finditer(text):
        pass
    if last is None:
        return None
    g = 1 if rx.groups >= 1 and last.group(1) is not None else 0
    s, e = _strip_span(text, last.start(g), last.end(g))
    return _Hit(text[s:e], s, e)


def extract_pattern(text: str | None, pattern: str | re.Pattern) -> str | None:
    """Last match of a user regex: group 1 if the pattern has one, else the whole match."""
    hit = _pattern_hit(text or "", pattern)
    return hit.value if hit else None


# --------------------------------------------------------------------------- text


def _text_hit(text: str, explicit: bool = False) -> _Hit | None:
    if explicit:  # the answer is what a marker, box or answer phrase introduces, if anything
        regions = [r for r in (_marker_region(text), _boxed_region(text)) if r is not None]
        for a, b in itertools.chain(regions, _phrase_regions(text)):
            hit = _text_hit(text[a:b])
            if hit is not None:
                return _Hit(hit.value, a + hit.start, a + hit.end)
        return None
    end = len(text)
    for line in reversed(text.splitlines(keepends=True)):
        start = end - len(line)
        s, e = _strip_span(text, start, end)
        while e > s and text[e - 1] == ".":
            e -= 1
        s, e = _strip_span(text, s, e)
        if e > s:
            return _Hit(text[s:e].lower(), s, e)
        end = start
    return None


# --------------------------------------------------------------------------- lists

# Inside lists a comma separates items, so no thousands grouping here.
_LNUM = r"(?<![\w.])\$?[-+\u2212]?(?:\d+|(?=\.\d))(?:\.\d+)?"
_LSEP = r"\s*(?:,\s*(?:and\s+)?|;|<=?|\u2264|\band\b|\|)\s*"
_LNUM_RE = re.compile(_LNUM)
_LRUN_RE = re.compile(rf"{_LNUM}(?:{_LSEP}{_LNUM})*")


def _runs(text: str, start: int, end: int) -> list[tuple[list[str], int, int]]:
    out = []
    for m in _LRUN_RE.finditer(text, start, end):
        vals = [normalise_number(x) for x in _LNUM_RE.findall(m.group())]
        if vals and None not in vals:
            out.append((vals, m.start(), m.end()))
    return out


def _list_hit(text: str, length: int | None = None, explicit: bool = False) -> _Hit | None:
    def pick(runs, first):
        if length is not None:
            fit = [r for r in runs if len(r[0]) == length]
            if fit:
                return fit[0] if first else fit[-1]
        many = [r for r in runs if len(r[0]) >= 2]
        if many:
            return many[0] if first else many[-1]
        return (runs[0] if first else runs[-1]) if runs else None

    fixed = [r for r in (_marker_region(text), _boxed_region(text)) if r is not None]
    for region in itertools.chain(fixed, _phrase_regions(text)):
        run = pick(_runs(text, *region), first=True)
        if run:
            return _Hit(",".join(run[0]), run[1], run[2])
    if explicit:
        return None
    run = pick(_runs(text, 0, len(text)), first=False)
    return _Hit(",".join(run[0]), run[1], run[2]) if run else None


def extract_list(text: str | None, length: int | None = None) -> str | None:
    """A list of numbers as "1.2,3.4,9.11" (each normalised).

    Looks in the answer marker/box/phrase first, else takes the last run of two or
    more numbers; with length given, runs of exactly that many numbers win.
    """
    hit = _list_hit(text or "", length)
    return hit.value if hit else None


# --------------------------------------------------------------------------- dispatch


def _hit(text: str, kind: str, pattern: str | None, explicit: bool = False) -> _Hit | None:
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if pattern is not None:
        outer = _pattern_hit(text, pattern)
        if outer is None or kind == "pattern":
            return outer
        inner = _hit(text[outer.start : outer.end], kind, None)
        if inner is None:
            return None
        return _Hit(inner.value, outer.start + inner.start, outer.start + inner.end)
    if kind == "number":
        return _number_hit(text, last_number=not explicit)
    if kind == "option":
        return _option_hit(text, explicit=explicit)
    if kind == "text":
        return _text_hit(text, explicit)
    if kind == "list":
        return _list_hit(text, explicit=explicit)
    raise ValueError("answer kind 'pattern' needs a pattern")


def extract_answer(text: str | None, kind: str = "number", pattern: str | None = None,
                   explicit: bool = False) -> str | None:
    """Extract the answer of the given kind ("number", "option", "text", "list", "pattern").

    With a pattern, the regex picks the region first and the kind then normalises it.
    With explicit, the answer must be marked as one ("####", \\boxed, "the answer is"):
    the last number (option, line, list) of a text cut off mid-reasoning is no answer.
    A pattern is the caller's own definition of an answer and counts as explicit.
    """
    hit = _hit(text or "", kind, pattern, explicit)
    return hit.value if hit else None


def answer_span(text: str | None, kind: str = "number", pattern: str | None = None,
                explicit: bool = False) -> tuple[int, int] | None:
    """(start, end) of the occurrence that extract_answer chose, or None."""
    hit = _hit(text or "", kind, pattern, explicit)
    return (hit.start, hit.end) if hit else None


# --------------------------------------------------------------------------- comparison

_TOL = Fraction(1, 10**6)


def _norm_text(s: str) -> str:
    return " ".join(str(s).casefold().split()).rstrip(".").strip()


def _numbers_equal(a: str, b: str) -> bool:
    na, nb = normalise_number(a), normalise_number(b)
    if na is None or nb is None:
        return _norm_text(a) == _norm_text(b)
    return abs(_to_fraction(na) - _to_fraction(nb)) <= _TOL


def answers_equal(a: str | None, b: str | None, kind: str = "number") -> bool:
    """Whether two extracted answers agree (numbers within 1e-6, lists item by item)."""
    if a is None or b is None:
        return False
    if kind == "number":
        return _numbers_equal(a, b)
    if kind == "list":
        xs = [x for x in re.split(r"\s*,\s*", str(a).strip().strip("[]()")) if x]
        ys = [y for y in re.split(r"\s*,\s*", str(b).strip().strip("[]()")) if y]
        return len(xs) == len(ys) and all(_numbers_equal(x, y) for x, y in zip(xs, ys))
    if kind == "option":
        return str(a).strip(" ()[].").upper() == str(b).strip(" ()[].").upper()
    return _norm_text(a) == _norm_text(b)

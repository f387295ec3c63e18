"""The answer a prompt asks for: which kind of answer multi-row decoders (CoT, self-consistency,
auto, branching) look for and score in each row's text.

`resolve_answer_format` is the one reader: `entropix generate`, the server and `entropix eval`
all call it, with the user's `--answer-format` / `answer_format` value or, without one, on the
prompt's own wording, so the decoder a user runs is the decoder the evaluation measures.
"""

from __future__ import annotations

import re

from entropix import EntropixError

__all__ = ["ANSWER_FORMATS", "COMPARE_PATTERN", "YESNO_PATTERN", "AnswerFormatError", "kind_pattern",
           "parse_answer_format", "prompt_answer_format", "question_options", "resolve_answer_format"]

ANSWER_FORMATS = ("number", "option", "yes-no", "list", "text", "regex:PATTERN")

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
YESNO_PATTERN = r"(?i)\b(yes|no)\b"


class AnswerFormatError(EntropixError, ValueError):
    """A bad --answer-format / answer_format value (one-line message)."""


def kind_pattern(kind: str, fmt: str | None = None, pattern: str | None = None) -> tuple[str, str | None]:
    """The (kind, pattern) a multi-row decoder looks for, from an answer kind and a task format."""
    if fmt == "yesno":  # "text" within the pattern: the word lowercased, as users compare it
        return "text", YESNO_PATTERN
    if fmt == "compare":
        return "number", COMPARE_PATTERN
    if kind in ("number", "list", "option", "text", "pattern"):
        return kind, pattern
    return "number", None


# ------------------------------------------------------------------ options named by the question

_LINE_A, _LINE_B = (re.compile(rf"(?m)^[ \t]*{c}[.)]\s") for c in "AB")


def _lettered(prompt: str) -> bool:
    """Whether the prompt lists lettered options: "(A) .. (B)", or lines "A. .." then "B. ..".

    Found with plain searches: the server reads any prompt, and a regex spanning from "(A)" to
    "(B)" backtracks quadratically over a long prompt."""
    a = prompt.find("(A)")
    if a >= 0 and prompt.find("(B)", a) >= 0:
        return True
    m = _LINE_A.search(prompt)
    return bool(m and _LINE_B.search(prompt, m.end()))


_WORD = r"[\w.+\-'/%$]+"  # one word or number
# "Which is heavier, a kilogram of feathers or a kilogram of steel?", "Which is larger: 9.9 or 9.11?"
_PHRASES = re.compile(r"[:,]\s*((?:[^:,]{1,40},\s*)*[^:,]{1,40}?),?\s+or\s+([^:,]{1,40})$")
# "Is 9.9 or 9.11 larger?", "Is it red, green or blue?": one-word options, at most one word after
_WORDS = re.compile(rf"(?i)\b(?:is|are|was|were|it|be|to|between|either|prefer|choose|pick)\s+"
                    rf"({_WORD}(?:,\s*{_WORD})*),?\s+or\s+({_WORD})(?:\s+{_WORD})?$")
_ARTICLE = re.compile(r"(?i)^(?:a|an|the)\s+")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)")


def _last_question(prompt: str) -> str | None:
    """The prompt's last question, without its "?" (a decimal point ends no sentence)."""
    end = prompt.rfind("?")
    if end < 0:
        return None
    starts = [m.end() for m in re.finditer(r"[.!?]\s|\n", prompt[:end])]
    return prompt[starts[-1] if starts else 0 : end].strip()


def question_options(prompt: str) -> list[str]:
    """The alternatives the prompt's last question offers ("X or Y", "X, Y or Z"); [] if none.

    Lettered options ("(A) ... (B) ...") are read as letters by the option kind, not here."""
    q = (_last_question(prompt) or "")[-300:]  # options sit near the "?"; the cap bounds the regexes' work
    if not re.search(r"(?i)\sor\s", q):
        return []
    # A wh-question names its options after a comma or colon ("Which city is bigger, Paris or London?");
    # elsewhere a comma lists them ("Is it red, green or blue?").
    wh = re.match(r"(?i)(?:which|what|who|whom|whose)\b", q)
    for rx in (_PHRASES, _WORDS) if wh else (_WORDS, _PHRASES):
        m = rx.search(q)
        if m:
            items = [*re.split(r"\s*,\s*", m.group(1)), m.group(2)]
            items = [_ARTICLE.sub("", x.strip(" \"'`*")).strip() for x in items]
            items = [x for x in dict.fromkeys(items) if x]
            # "yes or no" and "or not" ask for a yes / no answer (read before options are)
            if len(items) >= 2 and not {x.lower() for x in items} & {"no", "not"}:
                return items
    return []


def _options_format(prompt: str, options: list[str]) -> tuple[str, str]:
    """(kind, pattern) reading the last of the question's options an answer names."""
    if all(_NUMBER.fullmatch(x) for x in options):
        if re.search(rf"(?i)\b{_BIG}\b", prompt):  # the last number named is often the smaller one
            return "number", COMPARE_PATTERN
        alts = "|".join(re.escape(x) for x in sorted(options, key=len, reverse=True))
        return "number", rf"(?<![\w.])(?:{alts})(?![\w]|\.\d)"
    alts = "|".join(re.escape(x) for x in sorted(options, key=len, reverse=True))
    return "pattern", rf"(?i)(?<!\w)(?:{alts})(?!\w)"


# ------------------------------------------------------------------ reading the prompt

def _then(text: str, first: str, later: str, stop: str) -> bool:
    """Whether `later` follows a `first` before the next `stop` character. One pass: a regex
    "first[^stop]*later" would rescan the text from every `first`, a slow server on a long prompt."""
    first_rx, later_rx = re.compile(first, re.I), re.compile(later, re.I)
    pos = 0
    while (m := first_rx.search(text, pos)) is not None:
        end = text.find(stop, m.end())
        end = len(text) if end < 0 else end
        if later_rx.search(text, m.end(), end):
            return True
        pos = end + 1  # the first `first` of a piece reaches furthest: the rest of it can be skipped
    return False


def _compare(prompt: str) -> bool:  # "Which is larger ...?"
    return _then(prompt, r"\bwhich\b", rf"\b{_BIG}\b", "?")


def _sort(prompt: str) -> bool:  # "Sort these numbers from smallest to largest"
    return _then(prompt, r"\b(?:sort|order|arrange)\b", r"\b(?:smallest|largest|ascending|descending)\b", "\n")


# (test, answer kind, task format) after lettered options, yes/no and the question's own options;
# the first match wins, so the narrower wordings come before the generic number ones.
_WORDINGS = (
    (_compare, "number", "compare"),
    (_sort, "list", None),
    (lambda prompt: bool(re.search(r"(?i)\b\w+ letter of\b", prompt)), "text", None),
)
_NUMBER_WORDING = (r"(?i)\bhow (?:many|much|long|far|old)\b|\b(?:calculate|compute|solve)\b|\bas a number\b"
                   r"|\d\s*[-+*/\u00d7\u00f7^]\s*\(?\d")
# A question opening with an auxiliary verb and offering no alternatives ("Is the coin still heads up?");
# not can / could / will / would, which mostly open requests ("Can you write a poem?").
_POLAR = re.compile(r"(?i)^(?:is|are|was|were|does|do|did|should|has|have|had)\b"
                    r"(?!.*\sor\s(?!not\b))")


def prompt_answer_format(prompt: str) -> tuple[str, str | None] | None:
    """(kind, pattern) of the answer a prompt asks for; None when it names no answer format
    (a story, an open question)."""
    if _lettered(prompt):
        return "option", None
    if re.search(r"(?i)\byes\s*(?:or|/)\s*no\b", prompt):
        return kind_pattern("text", "yesno")
    options = question_options(prompt)
    if options:
        return _options_format(prompt, options)
    for test, kind, fmt in _WORDINGS:
        if test(prompt):
            return kind_pattern(kind, fmt)
    q = _last_question(prompt)
    if q and _POLAR.search(q):
        return kind_pattern("text", "yesno")
    if re.search(_NUMBER_WORDING, prompt):
        return "number", None
    return None


# ------------------------------------------------------------------ a format the user names


def parse_answer_format(value: str) -> str:
    """The user's format name, checked (a regex must compile and must not match nothing)."""
    if not isinstance(value, str):
        raise AnswerFormatError(f"answer format must be a string, got {value!r}")
    if value.startswith("regex:"):
        pattern = value[len("regex:"):]
        if not pattern:
            raise AnswerFormatError("answer format regex: needs a pattern after the colon, e.g. regex:(yes|no)")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise AnswerFormatError(f"answer format regex {pattern!r} does not compile: {e}") from None
        if rx.search("") is not None:  # every text would "answer" with an empty string
            raise AnswerFormatError(f"answer format regex {pattern!r} matches the empty string")
        return value
    if value not in ANSWER_FORMATS[:-1]:
        raise AnswerFormatError(f"unknown answer format {value!r}; use one of {', '.join(ANSWER_FORMATS)}")
    return value


def resolve_answer_format(prompt: str, given: str | None = None) -> tuple[str, str | None]:
    """(kind, pattern) for a prompt: from the user's format when given (number, option, yes-no,
    list, text or regex:PATTERN), else read from the prompt's wording, else number."""
    if given is None:
        return prompt_answer_format(prompt) or ("number", None)
    given = parse_answer_format(given)
    if given.startswith("regex:"):
        return "pattern", given[len("regex:"):]
    if given == "yes-no":
        return kind_pattern("text", "yesno")
    if given == "option":
        options = [] if _lettered(prompt) else question_options(prompt)
        return _options_format(prompt, options) if options else ("option", None)
    return given, None

"""letters (count a letter in a word, graded as a number) and position (the k-th letter
of a word, graded as a letter)."""

from __future__ import annotations

import random
import re

from .problem import Problem
from .words import WORDS

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def generate_letters(rng: random.Random) -> tuple[str, str, str, dict]:
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


_ORDINAL_WORDS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth",
                  7: "seventh", 8: "eighth", 9: "ninth", 10: "tenth"}


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def generate_position(rng: random.Random) -> tuple[str, str, str, dict]:
    word = rng.choice([w for w in WORDS if len(w) >= 5])
    # Not the first letter (trivial); up to the tenth, which ordinal words still cover.
    k = rng.randint(2, min(len(word), 10))
    nth = _ordinal(k) if rng.random() < 0.5 else _ORDINAL_WORDS[k]
    prompt = f"What is the {nth} letter of the word {word}?"
    return prompt, word[k - 1], "text", {"format": "letter", "word": word, "index": k}


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


def grade_letter(problem: Problem, output_text: str) -> tuple[str | None, bool]:
    """The letter the output names ("format": "letter")."""
    got = _letter_answer(output_text)
    return got, got == problem.expected.lower()

"""Byte tables and BPE building blocks shared by every vocabulary format.

Byte-level BPE (GPT-2's alphabet), SentencePiece pieces, rank-based merges (tiktoken) and
the pre-tokenizer split patterns the vocabularies were trained with.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

# Split patterns (the pre-tokenizer regexes these vocabularies were trained with).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    # Printable Latin-1 bytes stand for themselves; the others are moved to U+0100 and up
    # so that every byte has a visible, non-whitespace character.
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def byte_level_to_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level token; text outside the byte alphabet is taken as UTF-8."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def bytes_to_byte_level(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def sentencepiece_to_bytes(token: str) -> bytes:
    """Raw bytes of a SentencePiece token: ``<0xAB>`` byte pieces, and U+2581 as a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")


def merges_from_ranks(ranks: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to rank-based BPE (tiktoken) over ``ranks``.

    Rank-based BPE merges, at each step, the adjacent pair whose concatenation has the lowest
    rank. Listing every split (left, right) of every token whose halves are both tokens, in
    the order of the whole token's rank, gives a merge table that makes the same choices.
    """
    found: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                found.append((rank, lr, rr, left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def parse_merges(raw: Iterable[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``"a b"`` merge strings as pairs, dropping any the vocabulary cannot carry out."""
    merges = []
    for line in raw:
        parts = line.split(" ")
        if len(parts) == 2:
            left, right = parts
        else:
            # A token spelled with a real space makes the split ambiguous: take the split
            # whose halves and result are all tokens.
            for i in (i for i, c in enumerate(line) if c == " "):
                left, right = line[:i], line[i + 1 :]
                if left in vocab and right in vocab and left + right in vocab:
                    break
            else:
                continue
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return merges


def byte_level_pre_tokenizer(pattern: str | None):
    """Regex split (``None`` = GPT-2's own) followed by the byte-level mapping."""
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_engine(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    pre_tokenizer,
    *,
    ignore_merges: bool = False,
    normalizer=None,
) -> tokenizers.Tokenizer:
    # No unk token: every byte has a token in a byte-level vocabulary.
    engine = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    engine.pre_tokenizer = pre_tokenizer
    engine.decoder = decoders.ByteLevel()
    if normalizer is not None:
        engine.normalizer = normalizer
    return engine

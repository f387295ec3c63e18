"""SentencePiece-style GGUF vocabularies (`tokenizer.ggml.model` = "llama": Llama 2, Gemma):
pieces with scores, U+2581 for a space, `<0xAB>` byte pieces for what no piece spells.

llama.cpp encodes them by merging, again and again, the adjacent pair whose concatenation is
the highest-scoring piece (leftmost first on a tie). A BPE whose merges rank pairs by the score
of the piece they make does the same, so the Rust `tokenizers` BPE runs it.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, models, normalizers

from .vocab import sentencepiece_to_bytes

_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _merges(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every mergeable piece into two pieces, ranked by the whole piece's score."""
    order = sorted((i for i, t in enumerate(types) if t in (_NORMAL, _USER)), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        piece = tokens[i]
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                merges.append((piece[:k], piece[k:]))
    return merges


def spm_tokenizer_args(meta: dict[str, Any]) -> dict[str, Any]:
    """TextTokenizer arguments from a "llama" (SentencePiece) GGUF vocabulary."""
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    engine = Tokenizer(models.BPE(vocab, _merges(tokens, scores, types, vocab), byte_fallback=True,
                                  unk_token=tokens[int(unk)] if unk is not None else None))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if space_prefix else []
    engine.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    control = [i for i, t in enumerate(types) if t == _CONTROL and vocab.get(tokens[i]) == i]
    user = [i for i, t in enumerate(types) if t == _USER and vocab.get(tokens[i]) == i]
    engine.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    engine.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    token_bytes = [tok.encode("utf-8") if types[i] in (_CONTROL, _USER) else sentencepiece_to_bytes(tok)
                   for i, tok in enumerate(tokens)]

    def opt_id(key: str) -> int | None:
        value = meta.get(key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    return dict(
        engine=engine, token_bytes=token_bytes, special_ids=control, added_ids=user,
        bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        chat_template=meta.get("tokenizer.chat_template") or None,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        extra_stop_ids=[opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")],
        strip_leading_space=space_prefix,
    )

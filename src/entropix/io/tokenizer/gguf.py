"""GGUF vocabularies: token tables, token types, merges and pre-tokenizer names in the metadata."""

from __future__ import annotations

import warnings
from typing import Any

from tokenizers import AddedToken, normalizers, pre_tokenizers

from .gguf_spm import spm_tokenizer_args
from .vocab import (
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    byte_level_engine,
    byte_level_pre_tokenizer,
    byte_level_to_bytes,
    merges_from_ranks,
    parse_merges,
)

# GGUF `tokenizer.ggml.pre` names that share a split pattern (llama.cpp's names).
LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}

# GGUF token types (llama.cpp's llama_token_type).
GGUF_CONTROL = 3
GGUF_USER_DEFINED = 4
# Types stored as plain text rather than in the byte alphabet, and kept out of the merges.
GGUF_PLAIN_TEXT = (GGUF_CONTROL, GGUF_USER_DEFINED)


def gguf_merges(meta: dict, vocab: dict[str, int], types: list[int]) -> list[tuple[str, str]]:
    """The merge table of a GGUF vocabulary (from its merges, else from the token order)."""
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges:
        return parse_merges(raw_merges, vocab)
    # Older files may omit merges: treat the token order as ranks.
    ordinary = {t: i for t, i in vocab.items() if types[i] not in GGUF_PLAIN_TEXT}
    return merges_from_ranks(ordinary)


def gguf_pre_tokenizer(pre: str):
    """(pre-tokenizer, ignore_merges, normalizer) for a GGUF ``tokenizer.ggml.pre`` name."""
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level_pre_tokenizer(None)]), False, None
    if pre in LLAMA3_PRE:
        # ignore_merges as Llama 3's own tokenizer (and llama.cpp) do
        return byte_level_pre_tokenizer(LLAMA3_PATTERN), True, None
    if pre in QWEN2_PRE:
        return byte_level_pre_tokenizer(QWEN2_PATTERN), False, normalizers.NFC()
    if pre not in ("gpt2", "default"):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} not known; using GPT-2's split", stacklevel=5)
    return byte_level_pre_tokenizer(None), False, None


def _engine(meta: dict, tokens: list[str], types: list[int], pre: str):
    """The encoding engine; control and user-defined tokens are matched whole in the text (as
    llama.cpp does) and, being already in the vocab, keep their ids. (engine, control ids, user ids)"""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate spelling keeps its first id
    pre_tok, ignore_merges, normalizer = gguf_pre_tokenizer(pre)
    engine = byte_level_engine(
        vocab, gguf_merges(meta, vocab, types), pre_tok, ignore_merges=ignore_merges, normalizer=normalizer
    )
    control = [i for i, t in enumerate(types) if t == GGUF_CONTROL and vocab.get(tokens[i]) == i]
    user = [i for i, t in enumerate(types) if t == GGUF_USER_DEFINED and vocab.get(tokens[i]) == i]
    engine.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    engine.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    return engine, control, user


def gguf_tokenizer_args(meta: dict) -> dict[str, Any]:
    """TextTokenizer arguments from GGUF metadata (key -> value as ``GGUFReader`` field ``contents()``)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return spm_tokenizer_args(meta)
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}: byte-level BPE ('gpt2') and SentencePiece ('llama') "
            "are supported"
        )
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
    pre = meta.get("tokenizer.ggml.pre") or "default"
    engine, control, user = _engine(meta, tokens, types, pre)

    # Control / user-defined tokens are stored as plain text, the rest in the byte alphabet.
    token_bytes = [
        tok.encode("utf-8") if types[i] in GGUF_PLAIN_TEXT else byte_level_to_bytes(tok)
        for i, tok in enumerate(tokens)
    ]

    def opt_id(key):
        value = meta.get(key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = pre in LLAMA3_PRE  # Llama 3 always starts with <|begin_of_text|>
    return dict(
        engine=engine,
        token_bytes=token_bytes,
        special_ids=control,
        added_ids=user,
        bos_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        chat_template=meta.get("tokenizer.chat_template") or None,
        add_bos=bool(add_bos),
        extra_stop_ids=[opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")],
    )

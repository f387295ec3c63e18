"""Llama-3 style tiktoken rank files (``base64-token rank`` per line) as a BPE vocabulary."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from .chat import LLAMA3_TEMPLATE
from .vocab import LLAMA3_PATTERN, byte_level_engine, byte_level_pre_tokenizer, bytes_to_byte_level, merges_from_ranks


def llama3_special_tokens(first_id: int) -> dict[str, int]:
    """Llama 3's 256 reserved special tokens, numbered from ``first_id`` (the base vocab size)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names = named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]
    return {name: first_id + i for i, name in enumerate(names)}


def read_ranks(path) -> dict[bytes, int]:
    """token bytes -> rank from a tiktoken file (ValueError naming the bad line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank file line") from None
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken file")
    return ranks


def looks_tiktoken(path: Path) -> bool:
    """Whether a tokenizer.model starts like a tiktoken file (rather than a SentencePiece model)."""
    with open(path, "rb") as fh:
        head = fh.read(256).split(b"\n", 1)[0].split()
    return len(head) == 2 and head[1].isdigit()


def tiktoken_tokenizer_args(
    path,
    special_tokens: dict[str, int] | None = None,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """TextTokenizer arguments from a tiktoken file; Llama 3's specials when none are given."""
    ranks = read_ranks(path)
    # Tokens are held in the byte alphabet, where one character is one byte.
    vocab = {bytes_to_byte_level(b): r for b, r in ranks.items()}
    merges = merges_from_ranks(vocab)
    if special_tokens is None:
        special_tokens = llama3_special_tokens(max(ranks.values()) + 1)
    # Specials go into the vocab with their own ids so that adding them keeps those ids.
    for name, tid in special_tokens.items():
        vocab[name] = int(tid)
    engine = byte_level_engine(vocab, merges, byte_level_pre_tokenizer(LLAMA3_PATTERN), ignore_merges=True)
    ordered = sorted(special_tokens.items(), key=lambda kv: kv[1])
    engine.add_special_tokens([AddedToken(n, special=True, normalized=False) for n, _ in ordered])

    token_bytes = [b""] * (max(vocab.values()) + 1)
    for b, r in ranks.items():
        token_bytes[r] = b
    for name, tid in special_tokens.items():
        token_bytes[int(tid)] = name.encode("utf-8")
    bos_id = special_tokens.get("<|begin_of_text|>")
    return dict(
        engine=engine,
        token_bytes=token_bytes,
        special_ids=special_tokens.values(),
        bos_id=bos_id,
        eos_id=special_tokens.get("<|end_of_text|>"),
        chat_template=chat_template or LLAMA3_TEMPLATE,
        add_bos=bos_id is not None,
    )

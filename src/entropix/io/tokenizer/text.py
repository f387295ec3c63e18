"""TextTokenizer: one tokenizer over GGUF metadata, HF ``tokenizer.json`` and Llama-3 tiktoken files.

The Rust ``tokenizers`` library does the encoding. Decoding is done here, from a table of
the raw bytes behind every token, so that ``decode`` and the streaming detokenizer agree
byte for byte and a multi-byte character split across tokens is never shown half-done.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import tokenizers

from .chat import CHATML_TEMPLATE, END_OF_TURN_TOKENS, ChatTemplate, flatten_content
from .detokenizer import StreamingDetokenizer
from .gguf import gguf_tokenizer_args
from .hf_json import json_tokenizer_args, pick_template, read_config
from .tiktoken import looks_tiktoken, tiktoken_tokenizer_args


class TextTokenizer:
    """Text <-> token ids, chat rendering and streaming decode for one model."""

    fallback_template: str = CHATML_TEMPLATE  # used when the model files carry no chat template

    def __init__(
        self,
        engine: tokenizers.Tokenizer,
        token_bytes: list[bytes],
        *,
        special_ids: Iterable[int] = (),
        added_ids: Iterable[int] = (),
        bos_id: int | None = None,
        eos_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        extra_stop_ids: Iterable[int] = (),
        strip_leading_space: bool = False,
        engine_decode: bool = False,
    ):
        self._engine = engine
        self._token_bytes = token_bytes
        self._special_ids = frozenset(special_ids)
        # Tokens outside the merge table (specials and user-defined ones): only these may be
        # taken as end-of-turn markers, so a plain word "</s>" in some vocab is never a stop.
        self._added_ids = frozenset(added_ids) | self._special_ids
        self.vocab_size = len(token_bytes)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        # SentencePiece-style vocabularies write a space before the first word; decoding drops it.
        self._strip_leading_space = strip_leading_space
        # For vocabularies that are neither byte-level nor SentencePiece (WordPiece...), the
        # per-token bytes are only approximate, so whole-sequence decoding uses the engine.
        self._engine_decode = engine_decode
        self._compiled_template: ChatTemplate | None = None
        self._by_bytes: dict[bytes, int] | None = None
        self._special_re: re.Pattern | bool | None = None
        self.stop_ids = self._stops(eos_id, extra_stop_ids)

    def _stops(self, eos_id: int | None, extra_stop_ids: Iterable[int]) -> frozenset[int]:
        stops = set()
        if eos_id is not None:
            stops.add(eos_id)
        for name in END_OF_TURN_TOKENS:
            tid = self._engine.token_to_id(name)
            if tid is not None and tid in self._added_ids:
                stops.add(tid)
        stops.update(i for i in extra_stop_ids if i is not None and 0 <= i < self.vocab_size)
        return frozenset(stops)

    @property
    def strip_leading_space(self) -> bool:
        """Whether decoding drops the space SentencePiece writes before the first word."""
        return self._strip_leading_space

    # -- basic conversion ------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it become their single ids."""
        ids = self._engine.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def _special_pattern(self) -> re.Pattern | bool:
        """A regex matching the text of any added token (longest first); False if there is none."""
        if self._special_re is None:
            names = sorted({self._token_bytes[i].decode("utf-8", "replace") for i in self._added_ids}, key=len,
                           reverse=True)
            self._special_re = re.compile("|".join(re.escape(n) for n in names if n)) if any(names) else False
        return self._special_re

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` read as plain text: special-token text in it ("<|im_end|>")
        becomes ordinary tokens, never the special token (user content cannot forge turns)."""
        pattern = self._special_pattern()
        if not pattern:
            return self.encode(text, add_bos=False) if text else []
        ids, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                ids += self.encode(text[pos:m.start()], add_bos=False)
            s = m.group()  # split so that no piece is the special text any more (a one-character one cannot be)
            ids += self.encode_plain(s[:1]) + self.encode_plain(s[1:]) if len(s) > 1 else self.encode(s, add_bos=False)
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:], add_bos=False)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range (vocab size {self.vocab_size})")
        return self._token_bytes[token_id]

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Text of a sequence of ids (invalid UTF-8 shown as U+FFFD)."""
        if hasattr(ids, "tolist"):  # tensors / arrays
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        if self._engine_decode:
            return self._engine.decode(ids, skip_special_tokens=False)
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def token_text(self, token_id: int) -> str:
        """Display text of one token (an incomplete UTF-8 piece shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def detokenizer(self, *, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special=skip_special)

    # -- chat ------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for ``messages``, from the model's chat template (ChatML if none)."""
        source = self.chat_template if self.chat_template else self.fallback_template
        # Compiled once per template text; a later change of chat_template is picked up.
        if self._compiled_template is None or self._compiled_template.source != source:
            self._compiled_template = ChatTemplate(source)
        if not self.chat_template:
            messages = flatten_content(messages)
        context = {
            "bos_token": self.token_text(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else "",
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        return self._compiled_template.render(context)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Render then encode; BOS is added only when the template did not already write it."""
        ids = self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_bos=False)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # -- lookup ----------------------------------------------------------------------------

    def _bytes_index(self) -> dict[bytes, int]:
        """token bytes -> id; ordinary tokens first so that they win over a special token with the same text."""
        if self._by_bytes is None:
            by_bytes: dict[bytes, int] = {}
            order = [i for i in range(self.vocab_size) if i not in self._added_ids]
            order += sorted(self._added_ids)
            for i in order:
                b = self._token_bytes[i]
                if b:
                    by_bytes.setdefault(b, i)
            self._by_bytes = by_bytes
        return self._by_bytes

    def find_token(self, text: str) -> int:
        """The token whose text is ``text``, else the closest one.

        Closest means: same text once surrounding whitespace is stripped (nearest in length),
        else the longest token that is a prefix of ``text``. Ordinary tokens win over special ones.
        """
        if not text:
            raise ValueError("find_token needs a non-empty text")
        by_bytes = self._bytes_index()
        want = text.encode("utf-8")
        if want in by_bytes:
            return by_bytes[want]

        ordinary = [(b, i) for b, i in by_bytes.items() if i not in self._added_ids]
        core = text.strip()
        if core:
            same = [
                (abs(len(b) - len(want)), i)
                for b, i in ordinary
                if b.decode("utf-8", "replace").strip() == core
            ]
            if same:
                return min(same)[1]
        prefixes = [(-len(b), i) for b, i in ordinary if want.startswith(b)]
        if prefixes:
            return min(prefixes)[1]
        raise ValueError(f"no token resembles {text!r}")

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> TextTokenizer:
        """Build from GGUF metadata (key -> value as ``GGUFReader`` field ``contents()``)."""
        return cls(**gguf_tokenizer_args(meta))

    @classmethod
    def from_tokenizer_json(cls, path, tokenizer_config: dict | None = None) -> TextTokenizer:
        """Build from an HF ``tokenizer.json`` (+ the ``tokenizer_config.json`` dict)."""
        return cls(**json_tokenizer_args(path, tokenizer_config))

    @classmethod
    def from_tiktoken(
        cls,
        path,
        special_tokens: dict[str, int] | None = None,
        chat_template: str | None = None,
    ) -> TextTokenizer:
        """Build from a Llama-3 style tiktoken file (``base64-token rank`` per line)."""
        return cls(**tiktoken_tokenizer_args(path, special_tokens, chat_template))

    @classmethod
    def from_dir(cls, path) -> TextTokenizer:
        """Build from an HF model folder: tokenizer.json, else a tiktoken tokenizer.model."""
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        cfg = read_config(root)
        if (root / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(root / "tokenizer.json", cfg)
        for model in (root / "tokenizer.model", root / "original" / "tokenizer.model"):
            if model.is_file():
                if not looks_tiktoken(model):
                    raise ValueError(
                        f"{model} is not a tiktoken file (SentencePiece models need a tokenizer.json)"
                    )
                return cls.from_tiktoken(model, chat_template=pick_template(cfg.get("chat_template")))
        raise ValueError(f"no tokenizer in {root}: expected tokenizer.json or tokenizer.model")

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

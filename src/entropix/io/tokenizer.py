"""One tokenizer API over GGUF metadata, HF ``tokenizer.json`` and Llama-3 tiktoken files.

The Rust ``tokenizers`` library does the encoding. Decoding is done here, from a table of
the raw bytes behind every token, so that ``decode`` and the streaming detokenizer agree
byte for byte and a multi-byte character split across tokens is never shown half-done.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

__all__ = ["Tokenizer", "StreamingDetokenizer", "bytes_to_unicode"]

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

# GGUF `tokenizer.ggml.pre` names that share a split pattern (llama.cpp's names).
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}

# Tokens that end a turn in the common chat formats; any found in a vocabulary stops generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "</s>",
    "<|eom_id|>",
    "<｜end▁of▁sentence｜>",  # DeepSeek
)

# GGUF token types (llama.cpp's llama_token_type).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4
# Types stored as plain text rather than in the byte alphabet, and kept out of the merges.
_GGUF_PLAIN_TEXT = (_GGUF_CONTROL, _GGUF_USER_DEFINED)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DeepSeek-V2's chat format: "User: ...\n\nAssistant: ...<eos>", a system prompt as a plain paragraph
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# the format a family's model was tuned on, for files that carry no template (others: ChatML)
FAMILY_TEMPLATES = {"deepseek_v2": DEEPSEEK_TEMPLATE, "deepseek2": DEEPSEEK_TEMPLATE}

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _llama3_special_tokens(first_id: int) -> dict[str, int]:
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
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_to_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level token; text outside the byte alphabet is taken as UTF-8."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _bytes_to_byte_level(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def _sentencepiece_to_bytes(token: str) -> bytes:
    """Raw bytes of a SentencePiece token: ``<0xAB>`` byte pieces, and U+2581 as a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")


def _merges_from_ranks(ranks: dict[str, int]) -> list[tuple[str, str]]:
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


def _parse_merges(raw: Iterable[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
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


def _byte_level_pre_tokenizer(pattern: str | None):
    """Regex split (``None`` = GPT-2's own) followed by the byte-level mapping."""
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_level_engine(
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


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _walk(node: Any):
    """Every dict inside a JSON value (to find decoder / post-processor parts in a Sequence)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _gguf_merges(meta: dict, vocab: dict[str, int], types: list[int]) -> list[tuple[str, str]]:
    """The merge table of a GGUF vocabulary (from its merges, else from the token order)."""
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges:
        return _parse_merges(raw_merges, vocab)
    # Older files may omit merges: treat the token order as ranks.
    ordinary = {t: i for t, i in vocab.items() if types[i] not in _GGUF_PLAIN_TEXT}
    return _merges_from_ranks(ordinary)


def _gguf_pre_tokenizer(pre: str):
    """(pre-tokenizer, ignore_merges, normalizer) for a GGUF ``tokenizer.ggml.pre`` name."""
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, _byte_level_pre_tokenizer(None)]), False, None
    if pre in _LLAMA3_PRE:
        # ignore_merges as Llama 3's own tokenizer (and llama.cpp) do
        return _byte_level_pre_tokenizer(LLAMA3_PATTERN), True, None
    if pre in _QWEN2_PRE:
        return _byte_level_pre_tokenizer(QWEN2_PATTERN), False, normalizers.NFC()
    if pre not in ("gpt2", "default"):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} not known; using GPT-2's split", stacklevel=3)
    return _byte_level_pre_tokenizer(None), False, None


def _json_decode_mode(spec: dict) -> tuple[str, bool]:
    """How a tokenizer.json's tokens map to bytes ("byte_level", "sentencepiece" or
    "engine"), and whether decoding drops the leading space SentencePiece writes."""
    decoder_parts = list(_walk(spec.get("decoder")))
    decoder_types = {d.get("type") for d in decoder_parts}
    model = spec.get("model") or {}
    if "ByteLevel" in decoder_types:
        return "byte_level", False
    if not (decoder_types & {"Metaspace", "ByteFallback"} or model.get("byte_fallback")):
        return "engine", False
    strip = False
    for d in decoder_parts:
        if d.get("type") == "Strip" and d.get("content") == " " and d.get("start", 0) >= 1:
            strip = True
        if d.get("type") == "Metaspace" and (
            d.get("prepend_scheme") in ("first", "always") or d.get("add_prefix_space")
        ):
            strip = True
    return "sentencepiece", strip


def _json_token_bytes(engine: tokenizers.Tokenizer, added: dict[int, dict], mode: str) -> list[bytes]:
    """The raw bytes behind every id of a tokenizer.json vocabulary."""
    size = engine.get_vocab_size(with_added_tokens=True)
    if added:
        size = max(size, max(added) + 1)
    token_bytes = []
    for i in range(size):
        if i in added:
            # Added tokens are stored as the text they match.
            token_bytes.append(added[i]["content"].encode("utf-8"))
            continue
        tok = engine.id_to_token(i)
        if tok is None:
            token_bytes.append(b"")
        elif mode == "byte_level":
            token_bytes.append(_byte_level_to_bytes(tok))
        elif mode == "sentencepiece":
            token_bytes.append(_sentencepiece_to_bytes(tok))
        else:
            token_bytes.append(engine.decode([i], skip_special_tokens=False).encode("utf-8"))
    return token_bytes


def _json_bos_eos(engine: tokenizers.Tokenizer, spec: dict, cfg: dict) -> tuple[int | None, int | None, Any]:
    """(bos_id, eos_id, add_bos) from tokenizer_config.json, else from the post-processor."""

    def cfg_id(key):
        name = _token_content(cfg.get(key))
        return engine.token_to_id(name) if name is not None else None

    # The post-processor says which token (if any) the model's own tokenizer prepends.
    template_first = None
    for node in _walk(spec.get("post_processor")):
        if node.get("type") == "TemplateProcessing":
            single = node.get("single") or []
            if single and "SpecialToken" in single[0]:
                template_first = engine.token_to_id(single[0]["SpecialToken"]["id"])
            break
    bos_id = cfg_id("bos_token")
    if bos_id is None:
        bos_id = template_first
    eos_id = cfg_id("eos_token")
    if eos_id is None:
        # No config: fall back on the usual end-of-sequence spellings.
        found = (engine.token_to_id(n) for n in ("</s>", "<|end_of_text|>", "<|endoftext|>"))
        eos_id = next((i for i in found if i is not None), None)
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = bos_id is not None and template_first == bos_id
    return bos_id, eos_id, add_bos


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would corrupt prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=1)
def _jinja_env():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # Some templates mark assistant text with {% generation %}; we only need its body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    # Chat templates come from model files, so they run sandboxed; the whitespace options
    # are the ones the templates are written for (as HF renders them).
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _flatten_content(messages: list[dict]) -> list[dict]:
    """OpenAI-style content lists as plain text, for the built-in templates."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            m = {**m, "content": text}
        elif content is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


class Tokenizer:
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
        self._compiled_template = None
        self._by_bytes: dict[bytes, int] | None = None

        stops = set()
        if eos_id is not None:
            stops.add(eos_id)
        for name in END_OF_TURN_TOKENS:
            tid = engine.token_to_id(name)
            if tid is not None and tid in self._added_ids:
                stops.add(tid)
        stops.update(i for i in extra_stop_ids if i is not None and 0 <= i < self.vocab_size)
        self.stop_ids = frozenset(stops)

    # -- basic conversion ------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it become their single ids."""
        ids = self._engine.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` read as plain text: special-token text in it ("<|im_end|>")
        becomes ordinary tokens, never the special token (user content cannot forge turns)."""
        if getattr(self, "_special_re", None) is None:
            names = sorted({self._token_bytes[i].decode("utf-8", "replace") for i in self._added_ids}, key=len,
                           reverse=True)
            self._special_re = re.compile("|".join(re.escape(n) for n in names if n)) if any(names) else False
        if not self._special_re:
            return self.encode(text, add_bos=False) if text else []
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
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

    def detokenizer(self, *, skip_special: bool = False) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special=skip_special)

    # -- chat ------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for ``messages``, from the model's chat template (ChatML if none)."""
        source = self.chat_template if self.chat_template else self.fallback_template
        # Compiled once per template text; a later change of chat_template is picked up.
        if self._compiled_template is None or self._compiled_template[0] != source:
            self._compiled_template = (source, _jinja_env().from_string(source))
        if not self.chat_template:
            messages = _flatten_content(messages)
        context = {
            "bos_token": self.token_text(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else "",
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        return self._compiled_template[1].render(**context)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Render then encode; BOS is added only when the template did not already write it."""
        ids = self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_bos=False)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # -- lookup ----------------------------------------------------------------------------

    def find_token(self, text: str) -> int:
        """The token whose text is ``text``, else the closest one.

        Closest means: same text once surrounding whitespace is stripped (nearest in length),
        else the longest token that is a prefix of ``text``. Ordinary tokens win over special ones.
        """
        if not text:
            raise ValueError("find_token needs a non-empty text")
        if self._by_bytes is None:
            by_bytes: dict[bytes, int] = {}
            # Ordinary tokens first so that they win over a special token with the same text.
            order = [i for i in range(self.vocab_size) if i not in self._added_ids]
            order += sorted(self._added_ids)
            for i in order:
                b = self._token_bytes[i]
                if b:
                    by_bytes.setdefault(b, i)
            self._by_bytes = by_bytes
        want = text.encode("utf-8")
        if want in self._by_bytes:
            return self._by_bytes[want]

        ordinary = [(b, i) for b, i in self._by_bytes.items() if i not in self._added_ids]
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
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """Build from GGUF metadata (key -> value as ``GGUFReader`` field ``contents()``)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is supported"
            )
        tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
        pre = meta.get("tokenizer.ggml.pre") or "default"

        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)  # a duplicate spelling keeps its first id
        pre_tok, ignore_merges, normalizer = _gguf_pre_tokenizer(pre)
        engine = _byte_level_engine(
            vocab, _gguf_merges(meta, vocab, types), pre_tok, ignore_merges=ignore_merges, normalizer=normalizer
        )

        # Control and user-defined tokens are matched whole in the text (as llama.cpp does);
        # they are already in the vocab, so they keep their ids.
        control = [i for i, t in enumerate(types) if t == _GGUF_CONTROL and vocab.get(tokens[i]) == i]
        user = [i for i, t in enumerate(types) if t == _GGUF_USER_DEFINED and vocab.get(tokens[i]) == i]
        engine.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        engine.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

        # Control / user-defined tokens are stored as plain text, the rest in the byte alphabet.
        token_bytes = [
            tok.encode("utf-8") if types[i] in _GGUF_PLAIN_TEXT else _byte_level_to_bytes(tok)
            for i, tok in enumerate(tokens)
        ]

        def opt_id(key):
            value = meta.get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = pre in _LLAMA3_PRE  # Llama 3 always starts with <|begin_of_text|>
        return cls(
            engine,
            token_bytes,
            special_ids=control,
            added_ids=user,
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_id=opt_id("tokenizer.ggml.eos_token_id"),
            chat_template=meta.get("tokenizer.chat_template") or None,
            add_bos=bool(add_bos),
            extra_stop_ids=[opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")],
        )

    @classmethod
    def from_tokenizer_json(cls, path, tokenizer_config: dict | None = None) -> "Tokenizer":
        """Build from an HF ``tokenizer.json`` (+ the ``tokenizer_config.json`` dict)."""
        path = Path(path)
        engine = tokenizers.Tokenizer.from_file(str(path))
        # Padding / truncation settings saved with the file would alter plain encode() calls.
        engine.no_padding()
        engine.no_truncation()
        spec = json.loads(path.read_text(encoding="utf-8"))
        cfg = tokenizer_config or {}

        mode, strip = _json_decode_mode(spec)
        added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
        bos_id, eos_id, add_bos = _json_bos_eos(engine, spec, cfg)
        return cls(
            engine,
            _json_token_bytes(engine, added, mode),
            special_ids=[i for i, a in added.items() if a.get("special")],
            added_ids=added,
            bos_id=bos_id,
            eos_id=eos_id,
            chat_template=_pick_template(cfg.get("chat_template")),
            add_bos=bool(add_bos),
            strip_leading_space=strip,
            engine_decode=mode == "engine",
        )

    @classmethod
    def from_tiktoken(
        cls,
        path,
        special_tokens: dict[str, int] | None = None,
        chat_template: str | None = None,
    ) -> "Tokenizer":
        """Build from a Llama-3 style tiktoken file (``base64-token rank`` per line)."""
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

        # Tokens are held in the byte alphabet, where one character is one byte.
        vocab = {_bytes_to_byte_level(b): r for b, r in ranks.items()}
        merges = _merges_from_ranks(vocab)
        if special_tokens is None:
            special_tokens = _llama3_special_tokens(max(ranks.values()) + 1)
        # Specials go into the vocab with their own ids so that adding them keeps those ids.
        for name, tid in special_tokens.items():
            vocab[name] = int(tid)
        engine = _byte_level_engine(
            vocab, merges, _byte_level_pre_tokenizer(LLAMA3_PATTERN), ignore_merges=True
        )
        ordered = sorted(special_tokens.items(), key=lambda kv: kv[1])
        engine.add_special_tokens([AddedToken(n, special=True, normalized=False) for n, _ in ordered])

        size = max(vocab.values()) + 1
        token_bytes = [b""] * size
        for b, r in ranks.items():
            token_bytes[r] = b
        for name, tid in special_tokens.items():
            token_bytes[int(tid)] = name.encode("utf-8")
        bos_id = special_tokens.get("<|begin_of_text|>")
        return cls(
            engine,
            token_bytes,
            special_ids=special_tokens.values(),
            bos_id=bos_id,
            eos_id=special_tokens.get("<|end_of_text|>"),
            chat_template=chat_template or LLAMA3_TEMPLATE,
            add_bos=bos_id is not None,
        )

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Build from an HF model folder: tokenizer.json, else a tiktoken tokenizer.model."""
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        cfg: dict = {}
        if (root / "tokenizer_config.json").is_file():
            cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        # Newer HF repos keep the chat template in its own file.
        if not cfg.get("chat_template") and (root / "chat_template.jinja").is_file():
            cfg["chat_template"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if (root / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(root / "tokenizer.json", cfg)
        for model in (root / "tokenizer.model", root / "original" / "tokenizer.model"):
            if model.is_file():
                with open(model, "rb") as fh:
                    head = fh.read(256).split(b"\n", 1)[0].split()
                looks_tiktoken = len(head) == 2 and head[1].isdigit()
                if not looks_tiktoken:
                    raise ValueError(
                        f"{model} is not a tiktoken file (SentencePiece models need a tokenizer.json)"
                    )
                return cls.from_tiktoken(model, chat_template=_pick_template(cfg.get("chat_template")))
        raise ValueError(f"no tokenizer in {root}: expected tokenizer.json or tokenizer.model")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        # The incremental decoder holds back an incomplete character until its last byte
        # arrives, and gives U+FFFD only for bytes that can never become valid.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = tokenizer._strip_leading_space

    def _emit(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text.startswith(" "):
                text = text[1:]
        return text

    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        return self._emit(self._utf8.decode(self._tok.token_bytes(token_id)))

    def flush(self) -> str:
        """Whatever is still held back, with U+FFFD for an unfinished character."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return self._emit(text)

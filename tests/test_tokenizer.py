"""Tokenizer tests: parity with transformers on the embedded GGUF, tokenizer.json and tiktoken loading."""

from __future__ import annotations

import base64
import json
import os
import re

import pytest

from entropix.io.gguf import read_gguf
from entropix.io.tokenizer import StreamingDetokenizer, TextTokenizer

from tiny import gguf_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

SAMPLES = [
    "Hello world",
    "Hello, world! How are you today?",
    "   leading spaces and trailing   ",
    " single leading space",
    "digits 1234567890 and 3.14159 and 007",
    " 123 456 7890",
    "$1,000,000.99 costs 12% more",
    "emoji 😀👍🏽 and flags 🇫🇷🇯🇵",
    "中文测试，日本語のテキスト、한국어",
    "Ünïcödé ñ ß Ωμέγα кириллица",
    "مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # square\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
    "\n\n\nthree newlines then text\r\nand CRLF",
    "tabs\tand\t\tmore\ttabs",
    "I'm sure they'll say we've done it, can't you?",
    "ellipsis... and ... spaced . . . dots",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text<|endoftext|>more text",
    "<repo_name>entropix<file_sep>src/main.py",
    "a",
    "",
]


# --------------------------------------------------------------------------------------
# Fixtures: the embedded GGUF's tokenizer, once per module.


@pytest.fixture(scope="module")
def gguf_dir(gguf_path):
    return str(gguf_path.parent)


@pytest.fixture(scope="module")
def meta(gguf_path):
    """The tokenizer metadata as the checkpoint reads it (our GGUF reader)."""
    meta, _, _ = read_gguf(gguf_path)
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(meta):
    return TextTokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def hf(gguf_path):
    # transformers' own tokenizer of the GGUF, shared with the checkpoint writers (built once)
    return gguf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_saved(hf, tmp_path_factory):
    """transformers' tokenizer for the GGUF, written out as an HF folder."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------
# GGUF metadata


@pytest.mark.slow  # the gguf package's reader takes ~2 s over a 49k vocabulary
def test_our_gguf_reader_matches_the_gguf_package(gguf_dir, meta):
    import gguf

    reader = gguf.GGUFReader(os.path.join(gguf_dir, GGUF_NAME))
    theirs = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert meta == theirs


def test_gguf_fields(tok, meta):
    tokens = meta["tokenizer.ggml.tokens"]
    assert tok.vocab_size == len(tokens)
    assert tok.bos_id == meta["tokenizer.ggml.bos_token_id"]
    assert tok.eos_id == meta["tokenizer.ggml.eos_token_id"]
    assert tok.add_bos is bool(meta["tokenizer.ggml.add_bos_token"])
    assert tok.chat_template == meta["tokenizer.chat_template"]
    # Control tokens decode to their own text.
    for i, kind in enumerate(meta["tokenizer.ggml.token_type"]):
        if kind == 3:
            assert tok.token_text(i) == tokens[i]


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_transformers(tok, hf, text):
    expected = hf.encode(text, add_special_tokens=False)
    assert tok.encode(text) == expected
    # transformers' default (with its own special-token handling) agrees with our default.
    assert tok.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_special_tokens_are_single_ids(tok, hf):
    start = hf.convert_tokens_to_ids("<|im_start|>")
    end = hf.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("<|im_start|>assistant\nok<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert ids.count(start) == 1 and ids.count(end) == 1


def test_add_bos_override(tok):
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")
    assert tok.encode("hi", add_bos=False) == tok.encode("hi")


def test_decode_accepts_any_int_sequence(tok):
    ids = tok.encode("Hello world")
    assert tok.decode(tuple(ids)) == tok.decode(ids)
    import torch

    assert tok.decode(torch.tensor(ids)) == "Hello world"
    with pytest.raises(IndexError):
        tok.decode([tok.vocab_size])


def test_skip_special_in_decode(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special=True) == "user\nhi"


# --------------------------------------------------------------------------------------
# Chat


CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And times 3? 😀"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_system", [False, True])
def test_chat_matches_transformers(tok, hf, add_generation_prompt, with_system):
    messages = ([{"role": "system", "content": "You are terse."}] if with_system else []) + CONVERSATION
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_encode_chat(tok, hf):
    text = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tok.encode_chat(CONVERSATION)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text


def test_stop_ids(tok, hf):
    assert hf.convert_tokens_to_ids("<|im_end|>") in tok.stop_ids
    assert tok.eos_id in tok.stop_ids
    assert hf.convert_tokens_to_ids("<|endoftext|>") in tok.stop_ids
    # Only end-of-turn markers: not the turn opener, not ordinary text.
    assert hf.convert_tokens_to_ids("<|im_start|>") not in tok.stop_ids
    assert not set(tok.encode("Hello world")) & tok.stop_ids


# --------------------------------------------------------------------------------------
# find_token


def test_find_token_pause(tok):
    tid = tok.find_token(" ...")
    text = tok.token_text(tid)
    assert text == " ..." or text.strip() == "..." or " ...".startswith(text)
    assert tid not in tok.stop_ids


def test_find_token_exact_and_fallbacks(tok, hf):
    [hello] = hf.encode(" hello", add_special_tokens=False)
    assert tok.find_token(" hello") == hello
    assert tok.find_token("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    # Not a single token: the answer must be the closest token by text.
    text = tok.token_text(tok.find_token("  hello   "))
    assert text.strip() == "hello"
    long_word = " internationalizationxyzzy"
    text = tok.token_text(tok.find_token(long_word))
    assert long_word.startswith(text) and len(text) > 1
    with pytest.raises(ValueError):
        tok.find_token("")


# --------------------------------------------------------------------------------------
# Streaming detokenizer


STREAM_TEXT = "Emoji 😀👍🏽🇫🇷, CJK 中文测试 日本語, accents é ñ, Ωμέγα, done."


def test_streaming_never_splits_characters(tok):
    ids = tok.encode(STREAM_TEXT)
    # The text must really exercise the hold-back: some tokens are partial characters.
    partial = 0
    for i in ids:
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
    assert partial > 0

    detok = tok.detokenizer()
    assert isinstance(detok, StreamingDetokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT
    assert "" in pieces  # at least one token completed nothing yet


def test_streaming_flush_shows_unfinished_character(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert detok.add(ids[0]) == ""
    assert detok.flush() == "\ufffd"


def test_streaming_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\nhi 中<|im_end|>")
    detok = tok.detokenizer(skip_special=True)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special=True) == "assistant\nhi 中"


# --------------------------------------------------------------------------------------
# tokenizer.json


def test_from_tokenizer_json_round_trip(tok, hf_saved):
    cfg_path = hf_saved / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    tj = TextTokenizer.from_tokenizer_json(hf_saved / "tokenizer.json", cfg)
    assert tj.vocab_size == tok.vocab_size
    assert (tj.bos_id, tj.eos_id, tj.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
    assert tj.stop_ids == tok.stop_ids
    for text in SAMPLES:
        ids = tj.encode(text)
        assert ids == tok.encode(text)
        assert tj.decode(ids) == text


def test_from_dir_tokenizer_json(tok, hf_saved):
    loaded = TextTokenizer.from_dir(hf_saved)
    assert loaded.encode(STREAM_TEXT) == tok.encode(STREAM_TEXT)
    # The chat template travels with the folder (in tokenizer_config.json or chat_template.jinja).
    assert loaded.render_chat(CONVERSATION) == tok.render_chat(CONVERSATION)


def test_tokenizer_json_without_template_uses_chatml(hf_saved, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_saved / "tokenizer.json").read_bytes())
    loaded = TextTokenizer.from_dir(tmp_path)
    assert loaded.chat_template is None
    text = loaded.render_chat([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------
# tiktoken


# Multi-byte tokens in rank order after the 256 single bytes. "bc" ranks before "ab", so
# "abc" must come out as a + bc; "hello" is reachable as "he" + "llo".
TIKTOKEN_MERGED = [
    b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"in", b"ing",
    b" t", b"th", b" th", b" the", b"  ", b"\n\n", b"bc", b"ab", b"ca", b"123", b"12",
]
# Bytes in a scrambled order so that ids differ from byte values.
TIKTOKEN_BYTES = [bytes([(b * 7 + 3) % 256]) for b in range(256)]

# Llama 3's split regex restricted to ASCII (Python's re has no \p{L}); test texts are ASCII.
_ASCII_SPLIT = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\na-zA-Z0-9]?[a-zA-Z]+|[0-9]{1,3}"
    r"| ?[^\sa-zA-Z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TIKTOKEN_TEXTS = [
    "hello world",
    "hello hello  world\n\nthe thing",
    "abc abcabc cab bca",
    "12345 1123 12",
    "  the   world  ",
    "in thing ing inning",
    "x",
]


def _tiktoken_ranks() -> dict[bytes, int]:
    ranks = {b: i for i, b in enumerate(TIKTOKEN_BYTES)}
    for token in TIKTOKEN_MERGED:
        ranks[token] = len(ranks)
    return ranks


def _reference_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Rank-based BPE as tiktoken defines it: merge the adjacent pair of lowest rank."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return [ranks[p] for p in parts]
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@pytest.fixture()
def tiktoken_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in _tiktoken_ranks().items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_from_tiktoken_matches_reference_bpe(tiktoken_file):
    ranks = _tiktoken_ranks()
    tt = TextTokenizer.from_tiktoken(tiktoken_file)
    for text in TIKTOKEN_TEXTS:
        expected = [i for piece in _ASCII_SPLIT.findall(text) for i in _reference_bpe(piece.encode(), ranks)]
        assert tt.encode(text, add_bos=False) == expected, text
        assert tt.decode(expected) == text
    assert tt.encode("hello", add_bos=False) == [ranks[b"hello"]]
    assert tt.encode(" world", add_bos=False) == [ranks[b" world"]]
    assert tt.encode("abc", add_bos=False) == [ranks[b"a"], ranks[b"bc"]]


def test_from_tiktoken_matches_tiktoken_package(tiktoken_file):
    import tiktoken

    from entropix.io.tokenizer import LLAMA3_PATTERN

    tt = TextTokenizer.from_tiktoken(tiktoken_file)
    specials = {"<|begin_of_text|>": tt.bos_id, "<|eot_id|>": tt.find_token("<|eot_id|>")}
    enc = tiktoken.Encoding(
        "test", pat_str=LLAMA3_PATTERN, mergeable_ranks=_tiktoken_ranks(), special_tokens=specials
    )
    for text in TIKTOKEN_TEXTS + ["héllo wörld 😀 中文", "<|eot_id|>the end"]:
        assert tt.encode(text, add_bos=False) == enc.encode(text, allowed_special="all")


def test_from_tiktoken_specials_and_chat(tiktoken_file):
    n = len(_tiktoken_ranks())
    tt = TextTokenizer.from_tiktoken(tiktoken_file)
    assert tt.vocab_size == n + 256
    assert tt.bos_id == n and tt.eos_id == n + 1  # <|begin_of_text|>, <|end_of_text|>
    assert tt.add_bos
    eot = n + 9  # <|eot_id|> is the tenth special token in Llama 3
    assert tt.token_text(eot) == "<|eot_id|>"
    assert {tt.eos_id, eot} <= tt.stop_ids
    assert tt.encode("hello") == [tt.bos_id, _tiktoken_ranks()[b"hello"]]
    assert tt.encode("x<|eot_id|>y", add_bos=False)[1] == eot
    text = "héllo wörld 😀 中文"  # bytes outside the merges fall back to single bytes
    assert tt.decode(tt.encode(text)) == "<|begin_of_text|>" + text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tt.render_chat(messages) == expected
    ids = tt.encode_chat(messages)
    assert ids.count(tt.bos_id) == 1 and ids[0] == tt.bos_id  # the template wrote BOS; no second one
    assert tt.decode(ids) == expected


def test_from_tiktoken_custom_specials(tiktoken_file):
    n = len(_tiktoken_ranks())
    tt = TextTokenizer.from_tiktoken(tiktoken_file, special_tokens={"<|im_end|>": n, "<|im_start|>": n + 1})
    assert tt.vocab_size == n + 2
    assert tt.bos_id is None and not tt.add_bos
    assert tt.encode("<|im_start|>hello<|im_end|>") == [n + 1, _tiktoken_ranks()[b"hello"], n]
    assert n in tt.stop_ids


def test_chat_template_helpers(tiktoken_file):
    template = (
        "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}"
        "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}"
    )
    tt = TextTokenizer.from_tiktoken(tiktoken_file, chat_template=template)
    year, payload = tt.render_chat([{"role": "user", "content": "<a & b>"}]).split("|", 1)
    assert year.isdigit() and len(year) == 4
    assert json.loads(payload) == {"role": "user", "content": "<a & b>"}  # not HTML-escaped
    with pytest.raises(Exception, match="no messages"):
        tt.render_chat([])



@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append(1) }}",  # the immutable sandbox: no mutating calls either
    ],
)
def test_chat_template_sandbox_refuses_escapes(tiktoken_file, template):
    """Chat templates come from model files: the sandbox refuses attribute walks to Python
    internals, and the refusal is a one-line EntropixError, not a traceback."""
    from entropix import EntropixError

    tt = TextTokenizer.from_tiktoken(tiktoken_file, chat_template=template)
    with pytest.raises(EntropixError) as info:
        tt.render_chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "\n" not in message and "refused" in message

def test_from_dir_tiktoken(tiktoken_file):
    loaded = TextTokenizer.from_dir(tiktoken_file.parent)
    ranks = _tiktoken_ranks()
    assert loaded.encode("hello world", add_bos=False) == [ranks[b"hello"], ranks[b" world"]]


# --------------------------------------------------------------------------------------
# Errors


def test_from_dir_without_tokenizer_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer"):
        TextTokenizer.from_dir(tmp_path)


def test_from_dir_sentencepiece_model_raises(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(ValueError, match="tiktoken"):
        TextTokenizer.from_dir(tmp_path)


def test_unsupported_gguf_model_raises():
    with pytest.raises(ValueError, match="gguf|GGUF"):
        TextTokenizer.from_gguf_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})

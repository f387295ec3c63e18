"""The Tokenizer protocol: what entropix calls of a tokenizer, and the classes that satisfy it.

`isinstance` with a runtime-checkable protocol only checks that the members exist, so each
method is also called through the protocol's own signature, and the transformers wrapper is
compared with our tokenizer on the same vocabulary.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from entropix.adapters.tokenizers import HFDetokenizer, HFTokenizer
from entropix.io.tokenizer import (
    ChatTemplateTokenizer,
    Detokenizer,
    StreamingDetokenizer,
    TextTokenizer,
    Tokenizer,
)
from entropix.io.tokenizer import protocol

from tiny import small_tokenizer
from tinymodel import ByteTokenizer

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
TEXT = "The quick brown fox: héllo 😀"

# One call per protocol method, written against the protocol's signature.
CALLS = {
    "encode": ((TEXT,), {"add_bos": False}),
    "decode": (([72, 105],), {}),
    "encode_chat": ((MESSAGES,), {}),
    "token_text": ((72,), {}),
    "token_bytes": ((72,), {}),
    "detokenizer": ((), {}),
    "find_token": (("The",), {}),
}
PROPERTIES = {"vocab_size": int, "stop_ids": frozenset}
CHAT_CALLS = {"render_chat": ((MESSAGES,), {}), "encode_plain": (("<|im_end|>",), {})}
CHAT_PROPERTIES = {"bos_id", "add_bos"}


def _members(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")}


def test_the_protocol_is_a_leaf():
    tree = ast.parse(inspect.getsource(protocol))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith((".", "entropix"))]  # imports nothing from entropix
    assert _members(Tokenizer) == set(CALLS) | set(PROPERTIES)
    assert _members(ChatTemplateTokenizer) == set(CHAT_CALLS) | CHAT_PROPERTIES
    assert _members(Detokenizer) == {"add", "flush"}


@pytest.fixture(scope="module")
def hf_fast():
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=small_tokenizer(), bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


@pytest.fixture(scope="module")
def text_tok(hf_fast, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_tok")
    hf_fast.save_pretrained(folder)
    return TextTokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def hf_tok(hf_fast):
    return HFTokenizer(hf_fast)


@pytest.fixture(params=["text", "hf", "byte"])
def any_tok(request, text_tok, hf_tok):
    return {"text": text_tok, "hf": hf_tok, "byte": ByteTokenizer()}[request.param]


def _check(tok, calls, properties) -> None:
    for name, (args, kwargs) in calls.items():
        method = getattr(tok, name)
        inspect.signature(method).bind(*args, **kwargs)  # callable as the protocol says
        method(*args, **kwargs)
    for name in properties:
        getattr(tok, name)


def test_each_tokenizer_satisfies_the_protocol(any_tok):
    assert isinstance(any_tok, Tokenizer)
    _check(any_tok, CALLS, PROPERTIES)
    assert isinstance(any_tok.vocab_size, int) and any_tok.vocab_size > 0
    assert isinstance(any_tok.stop_ids, frozenset)
    assert isinstance(any_tok.encode(TEXT, add_bos=False), list)
    assert isinstance(any_tok.token_bytes(72), bytes) and isinstance(any_tok.token_text(72), str)
    assert isinstance(any_tok.detokenizer(), Detokenizer)


def test_typed_assignments(text_tok, hf_tok):
    # What a type checker sees: each class where a Tokenizer is expected.
    tokenizers: list[Tokenizer] = [text_tok, hf_tok, ByteTokenizer()]
    chat: ChatTemplateTokenizer = text_tok
    detoks: list[Detokenizer] = [text_tok.detokenizer(), hf_tok.detokenizer()]
    assert all(isinstance(t, Tokenizer) for t in tokenizers)
    assert isinstance(chat, ChatTemplateTokenizer)
    assert [type(d) for d in detoks] == [StreamingDetokenizer, HFDetokenizer]


def test_chat_template_tokenizer_is_ours_only(text_tok, hf_tok):
    """The server renders with plain-text contents only where render_chat and encode_plain exist."""
    assert isinstance(text_tok, ChatTemplateTokenizer)
    _check(text_tok, CHAT_CALLS, CHAT_PROPERTIES)
    assert not isinstance(hf_tok, ChatTemplateTokenizer)
    assert not isinstance(ByteTokenizer(), ChatTemplateTokenizer)


def test_hf_wrapper_agrees_with_ours(text_tok, hf_tok):
    assert hf_tok.vocab_size == text_tok.vocab_size
    ids = text_tok.encode(TEXT, add_bos=False)
    assert hf_tok.encode(TEXT, add_bos=False) == ids
    assert hf_tok.decode(ids) == text_tok.decode(ids) == TEXT
    # every token's bytes, pieces of a multi-byte character included
    assert [hf_tok.token_bytes(i) for i in ids] == [text_tok.token_bytes(i) for i in ids]
    assert b"".join(hf_tok.token_bytes(i) for i in ids) == TEXT.encode("utf-8")
    assert any("\ufffd" in text_tok.token_text(i) for i in ids)  # some ids are pieces of a character
    assert hf_tok.encode_chat(MESSAGES) == text_tok.encode_chat(MESSAGES)
    for tok in (hf_tok, text_tok):
        detok = tok.detokenizer()
        assert "".join(detok.add(i) for i in ids) + detok.flush() == TEXT

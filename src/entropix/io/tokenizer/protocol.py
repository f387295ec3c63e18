"""What the rest of entropix uses of a tokenizer, as structural types.

`Tokenizer` is the interface the host engine, the strategies, the loaders, the sampler
catalogue (pause-token lookup), the adapters and the server call. Our own `TextTokenizer`,
the transformers wrapper `adapters.tokenizers.HFTokenizer` and test doubles satisfy it.
`ChatTemplateTokenizer` adds what the server uses, when a tokenizer has it, to render a
chat with message contents tokenized as plain text.

A leaf module: it imports nothing from entropix.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["ChatTemplateTokenizer", "Detokenizer", "Tokenizer"]


@runtime_checkable
class Detokenizer(Protocol):
    """Generated ids to text as they arrive, never splitting a character."""

    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, chat prompts, stop tokens and per-token text for one model."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (valid ids are 0 .. vocab_size - 1)."""
        ...

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation (EOS and the end-of-turn tokens)."""
        ...

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; add_bos None: the model's default, False: never (mid-sequence)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids."""
        ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids for chat messages through the model's chat template (with the generation prompt)."""
        ...

    def token_text(self, token_id: int) -> str:
        """Display text of one token."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for."""
        ...

    def detokenizer(self) -> Detokenizer:
        """A fresh streaming detokenizer."""
        ...

    def find_token(self, text: str) -> int:
        """The token whose text is text, else the closest one (pause-token lookup)."""
        ...


@runtime_checkable
class ChatTemplateTokenizer(Tokenizer, Protocol):
    """A tokenizer that renders its chat template as text and can tokenize user content
    as plain text (so typed "<|im_end|>" never becomes the special token)."""

    @property
    def bos_id(self) -> int | None: ...

    @property
    def add_bos(self) -> bool: ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for messages (generation prompt included)."""
        ...

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text with special-token text kept as ordinary tokens."""
        ...

"""Streaming decode: generated ids to text as they arrive, never splitting a UTF-8 character."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .text import TextTokenizer


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer, *, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        # The incremental decoder holds back an incomplete character until its last byte
        # arrives, and gives U+FFFD only for bytes that can never become valid.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = tokenizer.strip_leading_space

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

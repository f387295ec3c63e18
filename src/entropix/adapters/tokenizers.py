"""A transformers tokenizer with the few methods our host engine and catalogue call.

`HFTokenizer` satisfies `entropix.io.tokenizer.Tokenizer` (the protocol), and its streaming
`HFDetokenizer` satisfies `entropix.io.tokenizer.Detokenizer`.
"""

from __future__ import annotations

from typing import Any, Sequence


class HFTokenizer:
    """encode / decode / encode_chat, streaming detokenizers, token_text / token_bytes,
    find_token, vocab_size and stop_ids over a transformers tokenizer."""

    def __init__(self, tokenizer: Any, model: Any = None) -> None:
        self.hf = tokenizer
        stops = set()
        for src in (tokenizer, getattr(model, "generation_config", None)):
            eos = getattr(src, "eos_token_id", None)
            stops.update([eos] if isinstance(eos, int) else (eos or []))
        self.stop_ids = frozenset(int(i) for i in stops if i is not None)
        self._texts: dict[str, int] | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids; add_bos None: as the tokenizer does by default, False: no special tokens
        (mid-sequence), True: no special tokens but the BOS first."""
        if add_bos is None:
            return list(self.hf.encode(text))
        ids = [int(i) for i in self.hf.encode(text, add_special_tokens=False)]
        bos = getattr(self.hf, "bos_token_id", None)
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, int(bos))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if hasattr(ids, "tolist"):  # tensors / arrays
            ids = ids.tolist()
        return self.hf.decode([int(i) for i in ids])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # newer transformers return a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]

    def token_text(self, token_id: int) -> str:
        return self.hf.decode([int(token_id)])

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: its text, or, for a piece of a multi-byte character,
        the bytes its byte-level or SentencePiece ``<0xAB>`` spelling stands for."""
        text = self.token_text(token_id)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str):
            from ..io.tokenizer.vocab import sentencepiece_to_bytes, unicode_to_bytes

            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return sentencepiece_to_bytes(piece)
            table = unicode_to_bytes()
            if piece and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return text.encode("utf-8")

    def detokenizer(self) -> HFDetokenizer:
        return HFDetokenizer(self.hf)

    def find_token(self, text: str) -> int:
        """The token whose text is `text`, else one whose stripped text is the same (nearest
        in length), else the longest token that is a prefix of it, like our tokenizer."""
        ids = self.hf.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
        if self._texts is None:
            self._texts = {}
            for i in range(len(self.hf)):
                self._texts.setdefault(self.hf.decode([i]), i)
        if text in self._texts:
            return self._texts[text]
        core = text.strip()
        same = [(abs(len(t) - len(text)), i) for t, i in self._texts.items() if core and t.strip() == core]
        if same:
            return min(same)[1]
        prefixes = [(-len(t), i) for t, i in self._texts.items() if t and text.startswith(t)]
        if prefixes:
            return min(prefixes)[1]
        raise ValueError(f"no token resembles {text!r}")


class HFDetokenizer:
    """Text released per token: the decoded text grows, held back while it ends mid-character."""

    def __init__(self, hf: Any) -> None:
        self.hf, self.ids, self.sent = hf, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.hf.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        out, self.sent = text[self.sent:], len(text)
        return out

    def flush(self) -> str:
        text = self.hf.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out

"""Tiny random models built in memory (vocab 256, hidden 64, 2 layers): no tokenizer files, no GGUF.

Bytes are tokens, so a `ByteTokenizer` is all the host engine needs for text.
"""

from __future__ import annotations

import codecs

import torch

from entropix.backends.torch.model import Transformer
from entropix.config import ModelConfig
from entropix.loading import LoadedModel

EOS = 0


def tiny_config(**over) -> ModelConfig:
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
    cfg.update(over)
    return ModelConfig(**cfg)


def tiny_model(seed: int = 0, scale: float = 0.15, dtype=torch.float32, fuse: bool = False, **over) -> Transformer:
    """Random weights, larger than default init so that distributions vary visibly."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**over))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    model.finish_setup()
    if fuse:
        model.fuse()
    return model.to(dtype).eval()


class _Detok:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._utf8.decode(bytes([token]))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class ByteTokenizer:
    """Token i is byte i; token 0 is the end of text."""

    vocab_size = 256
    stop_ids = frozenset({EOS})

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i != EOS).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return bytes([token]).decode("latin-1")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def detokenizer(self) -> _Detok:
        return _Detok()

    def find_token(self, text: str) -> int:
        b = text.encode("utf-8")
        return b[-1] if b else -1

    def encode_chat(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


def tiny_lm(seed: int = 0, fuse: bool = False, **over) -> LoadedModel:
    model = tiny_model(seed, fuse=fuse, **over)
    return LoadedModel(name="tiny", config=model.config, tokenizer=ByteTokenizer(), source="memory",
                       backend="torch", model=model, device="cpu", dtype="float32")

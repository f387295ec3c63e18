"""A tiny byte-level model trained in a few seconds to give chosen answers to chosen chats.

The browser tests need a real model on the real server whose greedy answers are known in
advance (markdown with a fenced code block, text that looks like HTML, a long answer to stop).
Random weights never say such things, so `parrot_lm` fits the tiny model of `tinymodel.py`
to them with Adam: what the server streams is what the model learnt, token by token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from entropix.backends.torch.kvcache import KVCache
from entropix.loading import LoadedModel

from tinymodel import EOS, ByteTokenizer, tiny_model


def chat_ids(tok: ByteTokenizer, user: str, system: str = "") -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.encode_chat(msgs)


def _batch(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, right-padded; only the answers' tokens (and their EOS) are scored."""
    seqs = [p + a for p, a in pairs]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for r, ((p, _), s) in enumerate(zip(pairs, seqs)):
        x[r, :len(s) - 1] = torch.tensor(s[:-1])
        y[r, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    return x, y


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    """Every position's logits through the model's own layers, one cache per layer: the
    engine's shared cache tensor is written in place, which autograd cannot differentiate."""
    cfg, (B, T) = model.config, x.shape
    caches = [KVCache(1, B, cfg.num_key_value_heads, cfg.head_dim, T, x.device, model.dtype) for _ in model.layers]
    mask, pos = caches[0].attention_mask(T)
    ang = pos[..., None].float() * model.inv_freq
    ang = torch.cat((ang, ang), dim=-1)[:, None]
    h = model.embed_tokens(x)
    for layer, cache in zip(model.layers, caches):
        h, _ = layer(h, ang.cos(), ang.sin(), cache, 0, mask, False)
    return model.lm_head(model.norm(h))


def parrot_lm(answers: dict[str, str | list[str]], *, long: dict[str, str] | None = None, steps: int = 100,
              seed: int = 0, context: int = 2048) -> LoadedModel:
    """A LoadedModel that answers each user message in `answers` with its text and EOS (a list:
    each of its texts, about equally likely); each message in `long` with its text repeated
    without end (until max_tokens)."""
    tok = ByteTokenizer()
    pairs = [(chat_ids(tok, q), list(a.encode()) + [EOS])
             for q, alts in answers.items() for a in ([alts] if isinstance(alts, str) else alts)]
    for q, unit in (long or {}).items():
        pairs.append((chat_ids(tok, q), list((unit * (120 // len(unit) + 1)).encode())[:120]))
    model = tiny_model(seed, scale=0.05, max_position_embeddings=context)
    x, y = _batch(pairs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend (2 s instead of 20 on a busy machine)
    try:
        for _ in range(steps):
            logits = _logits(model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    if loss.item() > 0.05 + sum(0.7 for a in answers.values() if not isinstance(a, str)):  # ln 2 per coin
        raise RuntimeError(f"the parrot did not learn its answers (loss {loss.item():.3f})")
    model.eval().requires_grad_(False)
    return LoadedModel(name="parrot", config=model.config, tokenizer=tok, source="memory",
                       backend="torch", model=model, device="cpu", dtype="float32")

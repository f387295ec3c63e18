"""The whole decode step as one compiled graph (`torch.compile`, inductor).

At batch 1 an eager decode step of the embedded model is ~30 layers x ~25 small ops, each
dispatched from Python: on a 2-core CPU about half of the step is outside the matmuls. Here the
step from the embedding to the logits (every layer's norms, RoPE, attention, SwiGLU, residuals,
the output projection) is traced once and inductor fuses the small ops around the projections.

The graph reads the KV cache and never writes it: a write into one layer's slice of the
[L, B, Hkv, S, D] cache would be turned by functionalization into a copy of the whole cache per
layer. Instead each layer attends over the cached keys (slots [0, S), masked per row) and its own
new key in one softmax, and the new keys and values of every layer come out of the graph and are
written by one indexed store per tensor after it. Batch and cache length are dynamic: one graph
serves every batch size from 2 up and every cache length (batch 1 gets its own).

Only the decode step (T == 1) of a plain model (Llama-family blocks with fused q/k/v, no sliding
window or soft-cap, a KVCache) is compiled; prefill and the other architectures run eager.
Where no compiler works (no C++ toolchain, an unsupported platform) the first compiled call
fails: one warning, and the model runs eager from then on.
"""

from __future__ import annotations

import math
import shutil
import sys

import torch

from .kvcache import KVCache
from .layers import MLP, HeadStats, PackedLinear, rotate_half, stats_from_scores
from .model import Attention, Block


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            valid: torch.Tensor, capture: bool) -> tuple[torch.Tensor, HeadStats | None]:
    """q [B, H, 1, D] over cached keys/values [B, Hkv, S, D] (valid [B, S]) and its own new
    k, v [B, Hkv, 1, D], in one softmax: out [B, H, 1, D]."""
    B, H, _, D = q.shape
    Hkv = keys.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # query head h reads key head h // (H / Hkv)
    scale = 1.0 / math.sqrt(D)
    old = (qg @ keys.transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    new = (qg * k).sum(-1, keepdim=True) * scale  # [B, Hkv, G, 1]
    masked = old.masked_fill(~valid[:, None, None, :], float("-inf"))
    top = torch.maximum(masked.amax(-1, keepdim=True), new)
    p_old, p_new = (masked - top).exp(), (new - top).exp()
    out = (p_old @ values + p_new * v) / (p_old.sum(-1, keepdim=True) + p_new)
    stats = None
    if capture:
        scores = torch.cat([old, new], -1).reshape(B, H, -1).float()
        stats = stats_from_scores(scores, torch.cat([valid, valid.new_ones(B, 1)], -1))
    return out.reshape(B, H, 1, D), stats


def _layer(block: Block, x, cos, sin, keys, values, valid, capture: bool):
    a = block.self_attn
    B = x.shape[0]
    H, Hkv, D = a.n_heads, a.n_kv, a.head_dim
    qkv = a.qkv_proj(block.input_layernorm(x)).view(B, 1, H + 2 * Hkv, D).transpose(1, 2)
    qk = qkv[:, :H + Hkv]
    if a.qk_norm:
        qk = torch.cat([a.q_norm(qk[:, :H]), a.k_norm(qk[:, H:])], 1)
    qk = qk * cos + rotate_half(qk) * sin
    q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
    out, stats = _attend(q, k, v, keys, values, valid, capture)
    x = x + a.o_proj(out.transpose(1, 2).reshape(B, 1, H * D))
    return x + block.mlp(block.post_attention_layernorm(x)), k, v, stats


def _step(model, tokens, cos, sin, keys, values, valid, capture: frozenset):
    """Logits [B, V] of one new token per row (the final hidden state [B, C] where the output
    projection is oneDNN's), the new keys and values [L, B, Hkv, 1, D], the captured statistics."""
    x = model.embed_tokens(tokens)
    new_k, new_v, stats = [], [], {}
    for i, block in enumerate(model.layers):
        x, k, v, s = _layer(block, x, cos, sin, keys[i], values[i], valid, i in capture)
        new_k.append(k)
        new_v.append(v)
        if s is not None:
            stats[i] = s
    h = model.norm(x[:, -1])
    # oneDNN's packed output projection is opaque to inductor: it runs after the graph
    logits = h if isinstance(model.lm_head, PackedLinear) else model.lm_head(h).float()
    return logits, torch.stack(new_k), torch.stack(new_v), stats


class CompiledStep:
    """The compiled graph with the eager work around it (positions, the mask, the cache write)."""

    def __init__(self, mode: str | None) -> None:
        self.graph = torch.compile(_step, dynamic=True, mode=mode)
        self.failed = False

    def __call__(self, model, tokens: torch.Tensor, cache: KVCache, capture: frozenset):
        """Logits [B, V] and statistics of one decode step, the cache moved on; None (the model
        then runs eager) once compiling has failed."""
        if self.failed:
            return None
        S = cache.max_length()
        cache.ensure_capacity(S + 1)
        starts, lengths = cache.device_lengths()
        pos = (lengths - starts).clamp(min=0)[:, None]  # [B, 1]
        cos, sin = model._rotary(pos, model.inv_freq, model.rope_amp)
        slot = torch.arange(S, device=pos.device)
        valid = (slot >= starts[:, None]) & (slot < lengths[:, None])  # [B, S]
        try:
            logits, new_k, new_v, stats = self.graph(model, tokens, cos, sin, cache.k[:, :, :, :S],
                                                     cache.v[:, :, :, :S], valid, capture)
        except Exception as e:  # no working compiler: say so once, run eager from here on
            self.failed = True
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"entropix: warning: torch.compile failed ({first[:160]}); decoding eager", file=sys.stderr)
            return None
        if isinstance(model.lm_head, PackedLinear):
            logits = model.lm_head(logits).float()
        cache.write_layers(new_k, new_v)
        cache.advance(1)
        return logits, stats


def compilable(block: Block) -> bool:
    """Plain fused attention and MLP (a Gemma block, MLA or MoE layer stays eager)."""
    a = block.self_attn
    return (type(block) is Block and type(a) is Attention and a.qkv_proj is not None and type(block.mlp) is MLP
            and a.scale is None and not a.cap)


def compile_decode(model, mode: str | None = None) -> bool:
    """Run the decode step (T == 1) of a plain model through one compiled graph. False (and
    nothing changed, one warning) where torch.compile cannot run here or the model is not plain."""
    if shutil.which("c++") is None and shutil.which("g++") is None and model.device.type == "cpu":
        print("entropix: warning: torch.compile needs a C++ compiler on the CPU (none found); decoding eager",
              file=sys.stderr)
        return False
    cfg = model.config
    if cfg.sliding_window or cfg.final_logit_softcapping or not all(compilable(b) for b in model.layers):
        print(f"entropix: warning: the compiled decode step covers Llama-family blocks; "
              f"{cfg.arch} decodes eager", file=sys.stderr)
        return False
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # a cache length that happens to equal the head dim must not be tied to it (a recompile one step later)
    fx_config.use_duck_shape = False
    model.compiled_step = CompiledStep(mode)
    return True

"""One forward pass over an mlx-lm model's modules, with a ragged cache and attention capture.

mlx-lm's model zoo supplies the modules and their weights (projections plain or quantized,
norms, the architecture's RoPE); this file only runs them in order, so that the newest
query's attention statistics of the captured layers can be formed and every row keeps its
own RoPE positions. Architectures whose blocks are pre-norm Llama blocks run: Llama,
Mistral, Qwen2 and Qwen3 (per-head q/k norms), DeepSeek (v1).

Shapes: B rows, T new tokens, S cache slots, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from ... import EntropixError
from .cache import RowCache
from .sums import rowsum

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "deepseek")
_LOG2E = 1.0 / math.log(2.0)


@dataclass
class HeadStats:
    """Attention of each row's newest query over its valid keys, reduced per head (one layer)."""

    entropy: mx.array  # [B, H] bits
    deviation: mx.array  # [B, H] sum over keys of |head's attention - mean head's attention|
    interaction: mx.array  # [B, H] mean |pre-softmax score| over valid keys


def newest_query_stats(q: mx.array, keys: mx.array, valid: mx.array, scale: float) -> HeadStats:
    """Statistics of q [B, H, D] against keys [B, Hkv, S, D] over valid [B, S], in fp32.

    Only this query's scores are formed ([B, H, S]), never the prompt x cache matrix."""
    B, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # query head h reads key head h // (H / Hkv)
    scores = (qg @ keys.transpose(0, 1, 3, 2)).reshape(B, H, S).astype(mx.float32) * scale
    ok = valid[:, None, :]
    scores = mx.where(ok, scores, 0.0)
    probs = mx.softmax(mx.where(ok, scores, -mx.inf), axis=-1)
    plogp = mx.where(probs > 0, probs * mx.log(mx.maximum(probs, 1e-38)), 0.0)
    entropy = -rowsum(plogp) * _LOG2E
    deviation = rowsum(mx.abs(probs - probs.mean(1, keepdims=True)))
    n_valid = mx.maximum(valid.sum(-1, keepdims=True), 1).astype(mx.float32)  # [B, 1]
    return HeadStats(entropy, deviation, rowsum(mx.abs(scores)) / n_valid)


def heads(attn) -> tuple[int, int]:
    """(query heads, key/value heads) under the names the zoo's attention modules use."""
    H = getattr(attn, "n_heads", None) or attn.num_attention_heads
    return H, getattr(attn, "n_kv_heads", None) or getattr(attn, "num_kv_heads", None) or H


def check_structure(model, arch: str) -> None:
    """A clear error for an mlx-lm model whose blocks this forward cannot run."""
    if arch not in ARCHITECTURES:
        raise EntropixError(f"the mlx backend runs {', '.join(ARCHITECTURES)} models, not {arch!r}")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    need = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    if not layers or not all(hasattr(layers[0], n) for n in need) or not all(
            hasattr(layers[0].self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "rope")):
        raise EntropixError(f"this {arch!r} model does not have Llama-style blocks: the mlx backend cannot run it")


def _attention(attn, x: mx.array, cache: RowCache, layer: int, mask, capture: bool):
    B, T, _ = x.shape
    H, Hkv = heads(attn)
    q = attn.q_proj(x).reshape(B, T, H, -1)
    k = attn.k_proj(x).reshape(B, T, Hkv, -1)
    v = attn.v_proj(x).reshape(B, T, Hkv, -1).transpose(0, 2, 1, 3)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's vector before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    pos = cache.positions()
    q = attn.rope(q.transpose(0, 2, 1, 3), offset=pos)  # [B, H, T, D], each row from its own position
    k = attn.rope(k.transpose(0, 2, 1, 3), offset=pos)
    keys, values = cache.update(layer, k, v)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
    stats = newest_query_stats(q[:, :, -1], keys, cache.valid(keys.shape[2]), attn.scale) if capture else None
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1)), stats


def forward(model, tokens: mx.array, cache: RowCache, capture_layers: tuple[int, ...] = ()):
    """Run tokens [B, T] after what the cache holds: fp32 logits [B, V] of the last position
    and the newest query's statistics of `capture_layers` (negative counts from the end)."""
    inner = model.model
    n_layers = len(inner.layers)
    capture = {i % n_layers for i in capture_layers}
    mask = cache.mask(tokens.shape[1])
    if mask is not None:
        mask = mask.astype(mx.bool_)
    h = inner.embed_tokens(tokens)
    stats: dict[int, HeadStats] = {}
    for i, block in enumerate(inner.layers):
        a, s = _attention(block.self_attn, block.input_layernorm(h), cache, i, mask, i in capture)
        h = h + a
        h = h + block.mlp(block.post_attention_layernorm(h))
        if s is not None:
            stats[i] = s
    cache.advance(tokens.shape[1])
    h = inner.norm(h[:, -1])
    head = getattr(model, "lm_head", None)
    logits = head(h) if head is not None else inner.embed_tokens.as_linear(h)
    return logits.astype(mx.float32), stats

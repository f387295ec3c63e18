"""The Llama transformer in JAX: pure functions over a parameter pytree.

params = {"embed_tokens": [V, C], "norm": [C], "lm_head": [V, C] (absent when tied),
          "layers": [{"input_layernorm": [C], "post_attention_layernorm": [C],
                      "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
                      "mlp": {"gate_proj", "up_proj", "down_proj"}}, ...]}
Matrices keep Hugging Face's [out, in] orientation, so a parameter's path names it as in a
checkpoint and `sharding.py` can address `layers.*.self_attn.q_proj` from outside; the
model knows no devices. The layers are a Python list (unrolled under jit): each layer's
weights stay separate buffers that the matmuls read in place.

The KV cache is a list of per-layer (k, v) [B, S, Hkv, D]; row b owns slots
[starts[b], lengths[b]). `prefill` builds it for left-padded prompts, `decode` appends one
token per row at each row's own length. Shapes: B rows, T new tokens, S cache slots,
H query heads, Hkv key/value heads, G = H / Hkv, D head dim, C model dim, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ...config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Inverse frequencies [D/2] (float32), with Llama-3 scaling when the config asks for it."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if freq_factors is not None:  # GGUF stores Llama-3 scaling as per-frequency divisors
        return (inv / np.asarray(freq_factors, np.float64)).astype(np.float32)
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_position_embeddings
        lo_wavelen, hi_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        inv = np.where(wavelen > lo_wavelen, inv / cfg.rope_factor, np.where(wavelen < hi_wavelen, inv, mid))
    return inv.astype(np.float32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    if x.dtype == jnp.float32:
        return x32 * w
    return w * x32.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] times w [out, in] (HF orientation): the contraction reads w in place."""
    return jnp.einsum("...i,oi->...o", x, w)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, D]; cos, sin [B, T, D] (rotate-half layout, as in HF Llama)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def rope_tables(inv_freq: jax.Array, pos: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    ang = pos[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    ang = jnp.concatenate([ang, ang], -1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def qkv(p: dict, x: jax.Array, cos, sin, cfg: ModelConfig):
    """q [B, T, H, D], k, v [B, T, Hkv, D] with RoPE on q and k."""
    B, T, _ = x.shape
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = p["self_attn"]
    q = linear(x, a["q_proj"]).reshape(B, T, H, D)
    k = linear(x, a["k_proj"]).reshape(B, T, Hkv, D)
    v = linear(x, a["v_proj"]).reshape(B, T, Hkv, D)
    return rope(q, cos, sin), rope(k, cos, sin), v


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, T, H, D] over keys/values [B, S, Hkv, D], mask [B, T, S]."""
    B, T, H, D = q.shape
    Hkv = keys.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, keys).astype(jnp.float32) * (1.0 / math.sqrt(D))
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    w = jax.nn.softmax(s, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", w, values)
    return out.reshape(B, T, H * D)


def newest_query_stats(q: jax.Array, keys: jax.Array, valid: jax.Array):
    """(entropy bits, deviation, interaction), each [B, H], of q [B, H, D] (the newest query)
    over keys [B, S, Hkv, D] with valid [B, S]: the twin of the torch model's statistics."""
    B, H, D = q.shape
    Hkv = keys.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, keys).reshape(B, H, -1).astype(jnp.float32) * (1.0 / math.sqrt(D))
    m = valid[:, None, :]
    scores = jnp.where(m, scores, 0.0)
    probs = jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=-1)
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
    entropy = -plogp.sum(-1) * (1.0 / math.log(2))
    deviation = jnp.abs(probs - probs.mean(1, keepdims=True)).sum(-1)
    n_valid = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(jnp.float32)
    return entropy, deviation, jnp.abs(scores).sum(-1) / n_valid


def mlp(p: dict, x: jax.Array) -> jax.Array:
    m = p["mlp"]
    return linear(jax.nn.silu(linear(x, m["gate_proj"])) * linear(x, m["up_proj"]), m["down_proj"])


def output_logits(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """fp32 logits [B, V] of the last hidden states x [B, C]."""
    w = params.get("lm_head", params["embed_tokens"])  # tied: the embedding
    return linear(rms_norm(x, params["norm"], cfg.rms_norm_eps), w).astype(jnp.float32)


def prefill(params: dict, inv_freq: jax.Array, tokens: jax.Array, starts: jax.Array, *, cfg: ModelConfig,
            capacity: int, capture: tuple[int, ...]):
    """Left-padded prompts tokens [B, T] (row b's text starts at column starts[b]) into a fresh
    cache of `capacity` slots. Returns (logits [B, V], stats per captured layer, cache)."""
    B, T = tokens.shape
    x = params["embed_tokens"][tokens]
    dtype = x.dtype
    cols = jnp.arange(T)
    pos = jnp.maximum(cols[None, :] - starts[:, None], 0)  # positions count from each row's first token
    cos, sin = rope_tables(inv_freq, pos, dtype)
    mask = (cols[None, None, :] >= starts[:, None, None]) & (cols[None, None, :] <= cols[None, :, None])
    mask = mask | (cols[None, None, :] == cols[None, :, None])  # a padding query sees itself: finite softmax
    cache, stats = [], []
    for i, p in enumerate(params["layers"]):
        h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
        q, k, v = qkv(p, h, cos, sin, cfg)
        x = x + linear(attend(q, k, v, mask), p["self_attn"]["o_proj"])
        x = x + mlp(p, rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps))
        if i in capture:
            stats.append(newest_query_stats(q[:, -1], k, mask[:, -1]))
        empty = jnp.zeros((B, capacity, k.shape[2], k.shape[3]), dtype)
        cache.append((jax.lax.dynamic_update_slice(empty, k, (0, 0, 0, 0)),
                      jax.lax.dynamic_update_slice(empty, v, (0, 0, 0, 0))))
    return output_logits(params, x[:, -1], cfg), stats, cache


def decode(params: dict, inv_freq: jax.Array, cache: list, tokens: jax.Array, starts: jax.Array,
           lengths: jax.Array, *, cfg: ModelConfig, capture: tuple[int, ...]):
    """One token per row, tokens [B], written at slot lengths[b] of row b.
    Returns (logits [B, V], stats per captured layer, cache)."""
    B = tokens.shape[0]
    x = params["embed_tokens"][tokens][:, None]  # [B, 1, C]
    S = cache[0][0].shape[1]
    pos = jnp.maximum(lengths - starts, 0)[:, None]  # [B, 1]
    cos, sin = rope_tables(inv_freq, pos, x.dtype)
    key = jnp.arange(S)[None, :]
    valid = ((key >= starts[:, None]) & (key <= lengths[:, None])) | (key == lengths[:, None])  # [B, S]
    rows = jnp.arange(B)
    new_cache, stats = [], []
    for i, (p, (kc, vc)) in enumerate(zip(params["layers"], cache)):
        h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
        q, k, v = qkv(p, h, cos, sin, cfg)
        kc, vc = kc.at[rows, lengths].set(k[:, 0]), vc.at[rows, lengths].set(v[:, 0])
        x = x + linear(attend(q, kc, vc, valid[:, None]), p["self_attn"]["o_proj"])
        x = x + mlp(p, rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps))
        if i in capture:
            stats.append(newest_query_stats(q[:, 0], kc, valid))
        new_cache.append((kc, vc))
    return output_logits(params, x[:, 0], cfg), stats, new_cache

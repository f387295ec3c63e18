"""The Llama transformer: RMSNorm, RoPE (plain or Llama-3 scaled), GQA attention, SwiGLU.

Shapes: B batch rows, T new tokens, S cache slots, H query heads, Hkv key/value heads,
D head dim, C model dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kvcache import KVCache


def rope_inv_freq(cfg: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [D/2], with Llama-3 scaling when the config asks for it."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if freq_factors is not None:  # GGUF stores Llama-3 scaling as per-frequency divisors
        return inv / freq_factors.to(torch.float64)
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_position_embeddings
        lo_wavelen = old / cfg.rope_low_freq_factor
        hi_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        inv = torch.where(wavelen > lo_wavelen, inv / cfg.rope_factor, torch.where(wavelen < hi_wavelen, inv, mid))
    return inv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; the same maths
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class AttentionCapture:
    """Attention of each row's newest query over its valid keys (one layer)."""

    probs: torch.Tensor  # [B, H, S] softmax probabilities, exactly 0 on invalid keys
    scores: torch.Tensor  # [B, H, S] pre-softmax scores, 0 on invalid keys
    valid: torch.Tensor  # [B, S] bool


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q, k and v in one matmul: one weight read and one kernel launch per layer
        self.wqkv = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, mask, capture: bool):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = F.linear(x, self.wqkv.weight).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # [B, H + 2Hkv, T, D]
        qk = qkv[:, :H + Hkv]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on q and k in one pass
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        cache.write(layer, k, v)
        S = mask.shape[-1]
        keys, values = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]  # [B, Hkv, S, D]
        if not capture:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=Hkv != H)
            return F.linear(out.transpose(1, 2).reshape(B, T, H * D), self.wo.weight), None
        # Explicit path: the same maths, keeping the probabilities for the metrics.
        rep = H // Hkv
        keys_h = keys.repeat_interleave(rep, dim=1)
        values_h = values.repeat_interleave(rep, dim=1)
        scores = (q @ keys_h.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [B, H, T, S]
        scores = scores.float().masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out = (probs.to(values_h.dtype) @ values_h).transpose(1, 2).reshape(B, T, H * D)
        valid = mask[:, 0, -1, :]  # [B, S]
        last_scores = scores[:, :, -1, :].masked_fill(~valid[:, None, :], 0.0)
        return F.linear(out, self.wo.weight), AttentionCapture(probs[:, :, -1, :], last_scores, valid)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate and up fused
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13.weight).split(self.hidden, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache, layer, mask, capture):
        # .forward directly: the per-call hooks of nn.Module cost ~4% of a decode step here
        h, cap = self.attention.forward(self.attention_norm.forward(x), cos, sin, cache, layer, mask, capture)
        x = x + h
        return x + self.feed_forward.forward(self.ffn_norm.forward(x)), cap


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg, rope_freq_factors).float(), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        capacity = (capacity + 255) // 256 * 256
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, capacity, self.device, self.dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, capture_layers: tuple[int, ...] = (),
                last_only: bool = True) -> tuple[torch.Tensor, dict[int, AttentionCapture]]:
        """Run T new tokens per row [B, T] after what the cache holds.

        Returns logits ([B, V] for the last position, or [B, T, V]) and the attention
        captures of `capture_layers` (negative indices count from the end).
        """
        B, T = tokens.shape
        n_layers = len(self.layers)
        capture = {i % n_layers for i in capture_layers}
        cache.ensure_capacity(cache.max_length() + T)
        starts, lengths = cache.device_lengths()
        S = cache.max_length() + T
        dev = tokens.device
        # Positions count from each row's first valid slot, so padding never shifts RoPE.
        pos = (lengths - starts)[:, None] + torch.arange(T, device=dev)  # [B, T]
        q_slot = lengths[:, None] + torch.arange(T, device=dev)  # [B, T]
        key = torch.arange(S, device=dev)
        mask = (key[None, None, :] >= starts[:, None, None]) & (key[None, None, :] <= q_slot[:, :, None])
        # A padding query has no valid key; letting it see its own slot keeps its
        # softmax finite (a NaN there would reach real rows through 0 * NaN).
        mask = mask | (key[None, None, :] == q_slot[:, :, None])
        mask = mask[:, None]  # [B, 1, T, S]
        ang = pos.clamp(min=0)[..., None].float() * self.inv_freq  # [B, T, D/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)

        x = self.tok_embeddings(tokens)
        caps: dict[int, AttentionCapture] = {}
        for i, layer in enumerate(self.layers):
            x, cap = layer.forward(x, cos, sin, cache, i, mask, i in capture)
            if cap is not None:
                caps[i] = cap
        cache.advance(T)
        if last_only:
            x = x[:, -1]
        return F.linear(self.norm.forward(x), self.output.weight).float(), caps

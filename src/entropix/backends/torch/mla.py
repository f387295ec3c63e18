"""DeepSeek-V2's multi-head latent attention (MLA) and its compressed KV cache.

Each token's keys and values are one latent c (kv_lora_rank numbers, normalised) plus one
rotary key shared by all heads (qk_rope_head_dim numbers); the cache stores only these.
Per head, key = [W_uk c, k_rope] and value = W_uv c, with W_uk, W_uv the two parts of
kv_b_proj. A few new tokens (decode) attend in the latent space: the query's non-rotary part
is taken through W_uk once ("absorbed"), so the scores are [q W_uk, q_rope] . [c, k_rope] and
the output is W_uv (attention-weighted c); no per-head keys are ever formed. Many new tokens
(prefill) expand the keys and values instead, which costs fewer operations there.

DeepSeek's rotary dimensions are interleaved pairs; they are regrouped into halves here (the
same permutation on queries and keys leaves every score unchanged), so that the model's
rotate-half cos/sin serve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .kvcache import KVCache
from .layers import Linear, RMSNorm, newest_query_stats, rotate_half
from .rope import mla_softmax_scale

ABSORB_MAX_T = 16  # up to this many new tokens per row attend in the latent space
_LATENT_EPS = 1e-6  # DeepSeek's q_a/kv_a norms keep their own epsilon, not the config's


class LatentCache(KVCache):
    """A KVCache whose k holds [c, k_rope] (kv_lora_rank + qk_rope_head_dim numbers) per token
    and layer as one key head, and whose v is empty: rows, lengths, masks and row surgery
    are the KVCache's."""

    def __init__(self, n_layers: int, batch: int, kv_lora_rank: int, rope_dim: int, capacity: int,
                 device, dtype) -> None:
        super().__init__(n_layers, batch, 1, kv_lora_rank + rope_dim, capacity, device, dtype)
        self.v = self.k.new_zeros(n_layers, batch, 1, self.k.shape[3], 0)  # no values: they are W_uv c
        self.kv_lora_rank = kv_lora_rank

    def write_latent(self, layer: int, latent: torch.Tensor) -> None:
        """Store latent [B, T, kv_lora_rank + rope] at each row's next T slots."""
        B, T, _ = latent.shape
        self.write(layer, latent[:, None], latent.new_zeros(B, 1, T, 0))


def _halves(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary pairs (x0, x1), (x2, x3)... regrouped as [x0, x2, ...; x1, x3, ...]."""
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.rank = H, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(C, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LATENT_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = Linear(C, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(C, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_EPS)
        self.kv_b_proj = Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, C, bias=False)
        self.scale = mla_softmax_scale(cfg)
        self.low_rank_q = bool(cfg.q_lora_rank)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank_q:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x, cos, sin, cache: LatentCache, layer: int, mask, capture: bool):
        B, T, _ = x.shape
        H, r = self.n_heads, self.rank
        q = self._query(x).view(B, T, H, self.nope + self.rope).transpose(1, 2)  # [B, H, T, dn + dr]
        q_nope, q_pe = q.split([self.nope, self.rope], -1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, self.rope], -1)  # [B, T, r], [B, T, dr]
        q_pe = _halves(q_pe)
        k_pe = _halves(k_pe)
        q_pe = q_pe * cos + rotate_half(q_pe) * sin
        k_pe = k_pe * cos[:, 0] + rotate_half(k_pe) * sin[:, 0]
        cache.write_latent(layer, torch.cat([self.kv_a_layernorm(c), k_pe], -1))
        S = mask.shape[-1]
        latent = cache.k[layer, :, :, :S]  # [B, 1, S, r + dr]
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, r)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # [H, dn, r], [H, dv, r]
        if T <= ABSORB_MAX_T:
            qa = torch.cat([q_nope @ w_uk, q_pe], -1)  # [B, H, T, r + dr]
            # every head reads the same latent keys: the H x T queries attend as one head, so
            # the keys are never repeated per head
            D = qa.shape[-1]
            heads_mask = mask.expand(B, H, T, S).reshape(B, 1, H * T, S)
            out = F.scaled_dot_product_attention(qa.reshape(B, 1, H * T, D), latent, latent[..., :r],
                                                 attn_mask=heads_mask, scale=self.scale)  # [B, 1, H T, r]
            out = out.view(B, H, T, r) @ w_uv.transpose(1, 2)  # [B, H, T, dv]
            q_last = qa[:, :, -1]
        else:
            kv = self.kv_b_proj(latent[:, 0, :, :r]).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], -1)  # [B, H, S, dn], [B, H, S, dv]
            keys = torch.cat([k_nope, latent[..., r:].expand(B, H, S, self.rope)], -1)
            out = F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1), keys, v, attn_mask=mask,
                                                 scale=self.scale)
            q_last = torch.cat([q_nope[:, :, -1:] @ w_uk, q_pe[:, :, -1:]], -1)[:, :, 0] if capture else None
        # the newest query's scores over the latent keys are its true attention scores
        stats = newest_query_stats(q_last, latent, mask[:, 0, -1], self.scale) if capture else None
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim)), stats

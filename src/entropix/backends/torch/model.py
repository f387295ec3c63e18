"""The Llama transformer in PyTorch: RMSNorm, RoPE (plain or Llama-3 scaled), GQA, SwiGLU.

Module and parameter names are Hugging Face's (without the "model." prefix), so a
checkpoint maps onto the model name for name and a tensor-parallel plan can address
`self_attn.q_proj` or `mlp.down_proj` from outside. The model knows no ranks.

Shapes: B batch rows, T new tokens, S cache slots, H query heads, Hkv key/value heads,
D head dim, C model dim, F feed-forward dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .kvcache import KVCache
from .layers import (MKLDNN_PACKED, MLP, HeadStats, Linear, PackedLinear, RMSNorm,  # noqa: F401 (re-exported)
                     newest_query_stats, norm_for, rotate_half, softcap)
from .rope import rope_amplitude, yarn_inv_freq
from .window import sliding_mask


def rope_inv_freq(cfg: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with Llama-3 or YaRN scaling when the config asks for it."""
    d = cfg.rope_dim
    if cfg.rope_type == "yarn":
        return yarn_inv_freq(cfg)
    if cfg.rope_type == "linear":  # positions divided by the factor, as transformers computes it (fp32)
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)) / cfg.rope_factor
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if freq_factors is not None:  # GGUF stores Llama-3 scaling as per-frequency divisors
        return (inv / freq_factors.to(torch.float64)).float()
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_position_embeddings
        lo_wavelen = old / cfg.rope_low_freq_factor
        hi_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        inv = torch.where(wavelen > lo_wavelen, inv / cfg.rope_factor, torch.where(wavelen < hi_wavelen, inv, mid))
    return inv.float()


def capped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
                     cap: float) -> torch.Tensor:
    """Attention with soft-capped scores (Gemma 2): q [B, H, T, D], keys / values [B, Hkv, S, D],
    mask [B, 1, T, S] (True: seen); the softmax in fp32."""
    H, Hkv = q.shape[1], keys.shape[1]
    if H != Hkv:
        keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
    scores = softcap((q @ keys.transpose(-1, -2)) * scale, cap)
    probs = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).to(q.dtype)
    return probs @ values


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, H, Hkv, D = cfg.hidden_size, self.n_heads, self.n_kv, self.head_dim
        self.q_proj = Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: each head of q and k normalised before RoPE
            self.q_norm = norm_for(cfg, D)
            self.k_norm = norm_for(cfg, D)
        self.qk_norm = cfg.qk_norm
        # Gemma: scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped (None / 0: SDPA's own)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.cap = cfg.attn_logit_softcapping
        self.qkv_proj: Linear | None = None  # set by fuse(): one matmul on a single device

    def fuse(self) -> None:
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        biased = self.q_proj.bias is not None
        self.qkv_proj = Linear(w.shape[1], w.shape[0], bias=biased, device="meta")
        self.qkv_proj.weight = nn.Parameter(w, requires_grad=False)
        if biased:
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            self.qkv_proj.bias = nn.Parameter(b, requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def head_stats(self, q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> HeadStats:
        """What capture computes; tensor parallelism (tp.py) sets a version per module that gathers over ranks."""
        if self.scale is None:
            return newest_query_stats(q, keys, valid)
        return newest_query_stats(q, keys, valid, self.scale, self.cap)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, mask, capture: bool):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # [B, H + 2Hkv, T, D]
            qk = qkv[:, :H + Hkv]
            if self.qk_norm:
                qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], 1)
            qk = qk * cos + rotate_half(qk) * sin  # RoPE on q and k in one pass
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        cache.write(layer, k, v)
        S = mask.shape[-1]
        keys, values = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]  # [B, Hkv, S, D]
        # SDPA whether or not statistics are captured: a row's output never depends on its neighbours' needs
        if self.cap:  # SDPA cannot soft-cap
            out = capped_attention(q, keys, values, mask, self.scale or D ** -0.5, self.cap)
        elif self.scale is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=Hkv != H)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=Hkv != H, scale=self.scale)
        stats = self.head_stats(q[:, :, -1], keys, mask[:, 0, -1]) if capture else None
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D)), stats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.mla:  # DeepSeek-V2: multi-head latent attention, routed experts after the dense layers
            from .mla import LatentAttention

            self.self_attn = LatentAttention(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            from .moe import MoE

            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, mask, capture):
        h, stats = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask, capture)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # an explicit weight skips the random init (on the meta device it would import torch._dynamo)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if cfg.gemma:
            from .gemma import GemmaBlock

            self.layers = nn.ModuleList(GemmaBlock(cfg, Attention(cfg)) for _ in range(cfg.num_hidden_layers))
        else:
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = norm_for(cfg, cfg.hidden_size)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # RoPE frequencies stay fp32 whatever .to() does to the weights: a plain attribute, not a buffer
        self.inv_freq = torch.empty(cfg.rope_dim // 2)
        self.local_inv_freq: torch.Tensor | None = None  # Gemma 3's sliding layers turn at their own base
        self.compiled_step = None  # set by compiled.compile_decode: the decode step as one graph

    def finish_setup(self, rope_freq_factors: torch.Tensor | None = None) -> None:
        """Tie the output to the embedding if the config says so and compute RoPE's
        frequencies (in fp32 whatever the weights' dtype): the one place both are set."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.config, rope_freq_factors).to(self.embed_tokens.weight.device)
        if self.config.rope_local_theta:
            local = self.config.replace(rope_theta=self.config.rope_local_theta, rope_type="default")
            self.local_inv_freq = rope_inv_freq(local).to(self.embed_tokens.weight.device)

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up into one matmul each (single device; tensor parallelism
        wants them apart)."""
        for layer in self.layers:
            for part in (layer.self_attn, layer.mlp):  # MLA and MoE layers have nothing to fuse
                if hasattr(part, "fuse"):
                    part.fuse()

    def pack_output(self) -> bool:
        """On a CPU in fp32, keep the output projection packed for oneDNN. Tied to the embedding
        (which lookups still read) that is a copy: vocab x hidden x 4 more bytes (113 MB for
        the embedded model). The packed weight is in no state_dict and stays on the CPU.
        False when it does not apply."""
        w = self.lm_head.weight
        if not (MKLDNN_PACKED and w.is_cpu and w.dtype == torch.float32):
            return False
        self.lm_head = PackedLinear(w)
        return True

    @property
    def rope_amp(self) -> float:
        return rope_amplitude(self.config)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        capacity = (capacity + 255) // 256 * 256
        if c.mla:  # the compressed form: kv_lora_rank + qk_rope_head_dim numbers per token and layer
            from .mla import LatentCache

            return LatentCache(c.num_hidden_layers, batch, c.kv_lora_rank, c.qk_rope_head_dim, capacity,
                               self.device, self.dtype)
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, capacity, self.device, self.dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, capture_layers: tuple[int, ...] = (),
                last_only: bool = True) -> tuple[torch.Tensor, dict[int, HeadStats]]:
        """Run T new tokens per row [B, T] after what the cache holds.

        Returns fp32 logits ([B, V] for the last position, or [B, T, V]) and the newest
        query's attention statistics of `capture_layers` (negative indices count from the end).
        """
        B, T = tokens.shape
        n_layers = len(self.layers)
        capture = {i % n_layers for i in capture_layers}
        if T == 1 and self.compiled_step is not None and type(cache) is KVCache:  # compiled.py's one graph
            out = self.compiled_step(self, tokens, cache, frozenset(capture))
            if out is not None:  # None: compiling failed here (one warning), eager from now on
                return out
        cache.ensure_capacity(cache.max_length() + T)
        mask, pos = cache.attention_mask(T)  # [B, 1, T, S], [B, T]
        if self.inv_freq.device != pos.device:  # the model moved
            self.inv_freq = self.inv_freq.to(pos.device)
        cos, sin = self._rotary(pos, self.inv_freq, self.rope_amp)
        local = self._rotary(pos, self.local_inv_freq) if self.local_inv_freq is not None else None
        window = self.config.sliding_window
        slid = sliding_mask(mask, cache, T, window) if window else mask

        x = self.embed_tokens(tokens)  # [B, T, C]
        if self.config.gemma:  # sqrt(hidden) in the weights' dtype first, as Gemma's own code rounds it
            x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)
        stats: dict[int, HeadStats] = {}
        for i, layer in enumerate(self.layers):
            sliding = window and self.config.slides(i)
            m = slid if sliding else mask
            c, s_ = local if sliding and local is not None else (cos, sin)
            x, s = layer(x, c, s_, cache, i, m, i in capture)
            if s is not None:
                stats[i] = s
        cache.advance(T)
        if last_only:
            x = x[:, -1]
        logits = self.lm_head(self.norm(x)).float()
        if self.config.final_logit_softcapping:
            logits = softcap(logits, self.config.final_logit_softcapping)
        return logits, stats

    def _rotary(self, pos: torch.Tensor, inv_freq: torch.Tensor, amp: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, T, D] in the model's dtype for positions [B, T] (fp32 angles)."""
        if inv_freq.device != pos.device:
            inv_freq = inv_freq.to(pos.device)
        ang = pos[..., None].float() * inv_freq  # [B, T, D/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = ang.cos(), ang.sin()
        if amp != 1.0:  # YaRN's attention factor rides on cos and sin
            cos, sin = cos * amp, sin * amp
        return cos.to(self.dtype), sin.to(self.dtype)

"""YaRN RoPE scaling (DeepSeek-V2, long-context Qwen): frequencies and attention scales."""

from __future__ import annotations

import math

import torch

from ...config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2]: interpolated (divided by the factor) for long wavelengths,
    kept for short ones, blended linearly between the beta_fast and beta_slow rotation counts."""
    d, base, factor = cfg.rope_dim, cfg.rope_theta, cfg.rope_factor
    original = cfg.rope_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `original`
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return (1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep


def rope_amplitude(cfg: ModelConfig) -> float:
    """YaRN's factor on cos and sin (so on q and k's rotary parts); 1 otherwise."""
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """DeepSeek's attention scale: 1/sqrt(qk head dim), times mscale(all_dim)^2 under YaRN."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale

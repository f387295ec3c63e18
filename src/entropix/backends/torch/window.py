"""Sliding-window attention (Mistral, Qwen): the causal mask cut to the last `window` positions."""

from __future__ import annotations

import torch

from .kvcache import KVCache


def sliding_mask(mask: torch.Tensor, cache: KVCache, T: int, window: int) -> torch.Tensor:
    """`mask` [B, 1, T, S] (the cache's, for T new tokens) keeping only keys with
    query - key < window, as transformers counts it. A row's slots are contiguous, so slot
    distance is position distance; the whole cache is kept, the window only masks."""
    _, lengths = cache.device_lengths()
    S = mask.shape[-1]
    q_slot = lengths[:, None] + torch.arange(T, device=mask.device)  # [B, T]
    key = torch.arange(S, device=mask.device)
    near = key[None, None, :] > q_slot[:, :, None] - window  # [B, T, S]
    return mask & near[:, None]

"""Gemma 2 / 3's decoder block: RMSNorms before and after attention and before and after the
MLP (a GeGLU). Attention and the MLP are the shared modules (model.Attention, passed in so that
this leaf imports no model code, and layers.MLP), set up by the config: Gemma's score scale and
soft cap, q/k norms, the gate's GELU."""

from __future__ import annotations

from torch import nn

from ...config import ModelConfig
from .layers import MLP, norm_for


class GemmaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: nn.Module) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.input_layernorm = norm_for(cfg, C)
        self.self_attn = attention
        self.post_attention_layernorm = norm_for(cfg, C)  # on the attention's output, before the residual
        self.pre_feedforward_layernorm = norm_for(cfg, C)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = norm_for(cfg, C)

    def forward(self, x, cos, sin, cache, layer, mask, capture):
        h, stats = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask, capture)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), stats

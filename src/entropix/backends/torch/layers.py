"""The building blocks every torch architecture shares: linear layers with a faster CPU path,
RMSNorm, the rotary half-turn, the newest query's attention statistics and the SwiGLU MLP.
A leaf: the attention variants (model.py, mla.py) and the experts (moe.py) import it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig


_MKL = torch.backends.mkl.is_available()
_COLUMNS = 512  # output columns per product in the chunked path


class Linear(nn.Linear):
    """nn.Linear with a faster CPU path for wide layers at decode batch sizes.

    For a product of 4 to 12 rows MKL's fp32 GEMM packs the whole weight first, which
    makes a 10-row decode step through the gate/up and vocabulary projections about twice
    as slow as reading the weights needs. Products over 512 output columns at a time keep
    each packed panel in cache and give the same numbers bit for bit (each output is the
    same dot product). Measured in benchmarks/bench_linear.py.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (_MKL and 4 <= rows <= 12 and self.bias is None and self.out_features >= 4 * self.in_features
                and x.is_cpu and x.dtype == torch.float32 and type(self.weight.data) is torch.Tensor  # not a DTensor
                and not (torch.is_grad_enabled() and self.weight.requires_grad)  # out= has no autograd
                and not torch.compiler.is_compiling()):  # out= would break compiled.py's graph
            x2 = x.reshape(rows, self.in_features)
            out = torch.empty(rows, self.out_features, dtype=x.dtype)
            for i in range(0, self.out_features, _COLUMNS):
                torch.mm(x2, self.weight[i:i + _COLUMNS].t(), out=out[:, i:i + _COLUMNS])
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


MKLDNN_PACKED = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """A bias-free CPU fp32 projection whose weight is held in oneDNN's packed layout.

    For the vocabulary projection this costs nothing at one row and saves about a
    third at 4 to 16 rows (no per-call re-packing of a V x C matrix); a load-time
    choice for a single CPU, like fusing.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)  # opaque: not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


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


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalised and scaled by (offset + weight) in fp32, then cast (HF folders
    store weight - 1, so offset 1; llama.cpp's GGUF files store the sum, offset 0)."""

    def __init__(self, dim: int, eps: float, offset: float) -> None:
        super().__init__(dim, eps)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() + self.offset if self.offset else self.weight.float()
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, scale, self.eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype)


def norm_for(cfg: ModelConfig, dim: int) -> RMSNorm:
    """The family's RMSNorm over `dim` features."""
    return GemmaRMSNorm(dim, cfg.rms_norm_eps, cfg.norm_weight_offset) if cfg.gemma else RMSNorm(dim, cfg.rms_norm_eps)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's soft cap: cap * tanh(x / cap), a smooth clamp to (-cap, cap)."""
    return torch.tanh(x / cap) * cap


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class HeadStats:
    """Attention of each row's newest query over its valid keys, reduced per head (one layer)."""

    entropy: torch.Tensor  # [B, H] bits
    deviation: torch.Tensor  # [B, H] sum over keys of |head's attention - mean head's attention|
    interaction: torch.Tensor  # [B, H] mean |pre-softmax score| over valid keys


def newest_query_stats(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                       scale: float | None = None, cap: float = 0.0) -> HeadStats:
    """Statistics of q [B, H, D] (the newest query) against keys [B, Hkv, S, D], valid [B, S];
    `scale` multiplies the scores (1/sqrt(D) unless given), `cap` soft-caps them (Gemma 2).

    Only this query's scores are formed ([B, H, S] in fp32), never the prompt x cache matrix.
    """
    B, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    qg = q.view(B, Hkv, H // Hkv, D)  # query head h reads key head h // (H / Hkv)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (qg @ keys.transpose(-1, -2)).view(B, H, S).float() * scale  # [B, H, S]
    if cap:
        scores = softcap(scores, cap)
    return stats_from_scores(scores, valid)


def stats_from_scores(scores: torch.Tensor, valid: torch.Tensor) -> HeadStats:
    """The statistics of scaled pre-softmax scores [B, H, S] (fp32) over valid keys [B, S]."""
    scores = scores.masked_fill(~valid[:, None, :], 0.0)
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
    entropy = torch.special.entr(probs).sum(-1) * (1.0 / math.log(2))  # entr is 0 where p is 0
    deviation = (probs - probs.mean(1, keepdim=True)).abs().sum(-1)
    n_valid = valid.sum(-1, keepdim=True).clamp_min(1).float()  # [B, 1]
    return HeadStats(entropy, deviation, scores.abs().sum(-1) / n_valid)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, Fd = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, Fd, bias=False)
        self.up_proj = Linear(C, Fd, bias=False)
        self.down_proj = Linear(Fd, C, bias=False)
        self.gate_up_proj: Linear | None = None  # set by fuse()
        # GeGLU (Gemma) instead of SwiGLU: tanh-approximated or exact GELU on the gate
        self.gelu = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(cfg.hidden_act)

    def fuse(self) -> None:
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up_proj = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        self.gate_up_proj.weight = nn.Parameter(w, requires_grad=False)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.gelu is not None:
            return self.down_proj(F.gelu(gate, approximate=self.gelu) * up)
        return self.down_proj(F.silu(gate) * up)

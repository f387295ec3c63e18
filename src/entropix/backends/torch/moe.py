"""DeepSeek-V2's mixture of experts: softmax top-k routing, routed experts, shared experts.

The routed experts' weights are stacked ([E, 2F, C] gate and up, [E, C, F] down; checkpoints
store them per expert and the checkpoint reader stacks them). Dispatch is batched: the
(token, choice) pairs are sorted by expert, each expert that was chosen runs one product over
its contiguous run of tokens, and the weighted results are added back per token. The only
Python loop is over the experts chosen in this step, never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    """Scores [N, E] = softmax(x W^T) in fp32 (as DeepSeek routes), then the top-k per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k, self.method = cfg.num_experts_per_tok, cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, expert ids [N, k]) for tokens x [N, C]."""
        scores = F.linear(x.float(), self.weight.float()).softmax(-1)
        if self.method == "group_limited_greedy":  # only experts of the topk_group best groups compete
            N, E = scores.shape
            groups = scores.view(N, self.n_group, E // self.n_group)
            best = groups.amax(-1).topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            keep = torch.zeros(N, self.n_group, dtype=torch.bool, device=x.device).scatter_(1, best, True)
            scores = scores.masked_fill(~keep[:, :, None].expand_as(groups).reshape(N, E), 0.0)
        weights, ids = scores.topk(self.top_k, dim=-1)
        if self.norm and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, C, Fd = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fd, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, Fd))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] * expert_{ids[n, j]}(x[n]) for x [N, C], ids and weights [N, k]."""
        N, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()  # one host read
        xs = x.index_select(0, token)  # [N k, C]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = xs[start:start + n]
                gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)
                out[start:start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.replace(intermediate_size=shared)) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x2)
        y = self.experts(x2, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        return y.view(shape)

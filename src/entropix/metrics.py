"""Uncertainty metrics: pure tensor functions, per batch row, on the device.

Entropies are in bits. Nothing here talks to the host.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def logit_metrics(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, varentropy and top-1/top-2 margin of next-token distributions.

    logits: [B, V]. Returns tensors of shape [B]:
      entropy     H = -sum p log2 p
      varentropy  V = sum p (log2 p + H)^2   (variance of the surprisal)
      margin      p(top-1) - p(top-2)
      logz        log of the softmax normaliser (natural log), so that a sampler can get
                  any token's log-probability as logits - logz without another pass
    """
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)  # natural log
    p = logp.exp()
    log2p = logp / LN2
    # p * log p is 0 where p == 0; masked to avoid 0 * -inf
    plog = torch.where(p > 0, p * log2p, torch.zeros_like(p))
    ent = -plog.sum(-1)
    dev = torch.where(p > 0, p * (log2p + ent[:, None]) ** 2, torch.zeros_like(p))
    vent = dev.sum(-1)
    top2, top_i = p.topk(2, dim=-1)
    # logz from the top token, whose logit is always finite (one gather, not a vocab pass)
    logz = (x.gather(1, top_i[:, :1]) - logp.gather(1, top_i[:, :1]))[:, 0]
    return {"entropy": ent, "varentropy": vent, "margin": top2[:, 0] - top2[:, 1], "logz": logz}


def attention_metrics(probs: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of one layer's attention for each row's newest query, over valid keys only.

    probs:  [B, H, S] attention probabilities (0 on invalid keys)
    scores: [B, H, S] pre-softmax scores (0 on invalid keys)
    valid:  [B, S] bool
    Returns [B] tensors:
      attn_entropy       mean over heads of each head's entropy over the valid keys (bits)
      attn_entropy_var   variance across heads of the per-head entropy
      agreement          mean over heads and keys of |head's attention - mean head's attention|, summed over keys
      interaction        mean |score| over valid keys and heads
    """
    p = probs.float()
    plog = torch.where(p > 0, p * torch.log2(p.clamp_min(1e-30)), torch.zeros_like(p))
    head_ent = -plog.sum(-1)  # [B, H]
    mean_ent = head_ent.mean(-1)
    var_ent = head_ent.var(-1, unbiased=False)
    mean_head = p.mean(1, keepdim=True)  # [B, 1, S]
    agreement = (p - mean_head).abs().sum(-1).mean(-1)  # [B]
    n_valid = valid.sum(-1).clamp_min(1).float()  # [B]
    interaction = scores.float().abs().sum(-1).mean(-1) / n_valid
    return {"attn_entropy": mean_ent, "attn_entropy_var": var_ent, "agreement": agreement, "interaction": interaction}


LOGIT_KEYS = ("entropy", "varentropy", "margin")
ATTN_KEYS = ("attn_entropy", "attn_entropy_var", "agreement", "interaction")

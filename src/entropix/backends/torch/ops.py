"""The sampler's device maths in PyTorch: metrics, filters, draws and the policies.

Every function works on a whole group of rows at once with per-row parameters; the
random draws come from the host (uniforms [B, N]), so a draw is one inverse-CDF search
per row and candidate, with no generator state on the device. `sampler/reference.py` is
the float64 definition; tests/test_conformance.py holds this module and its twins to it.
"""

from __future__ import annotations

import math

import torch

from ...sampler.policy import ADAPTIVE, BRANCH, FLOWING, PAUSE, TREADING, Entropix, EntropixTable, Sample
from ..base import entropix_arrays
from .model import HeadStats

LN2 = math.log(2.0)
_U_MAX = 1.0 - 2.0 ** -24  # a float32 uniform that rounds to 1 would pick past the last kept token


def logit_metrics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities [B, V], entropy [B], varentropy [B]) in bits, from one log_softmax.

    entropy H = -sum p log2 p; varentropy V = sum p (log2 p + H)^2, the variance of the surprisal,
    computed as E[(log p)^2] - H^2 in nats and converted per row: every pass over a [B, V]
    tensor costs (at 10 rows it no longer fits a core's cache), and the cancellation error
    (about 1e-7 of E[(log p)^2]) is far below any threshold.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # Any p > 0 in fp32 has log p >= -104: the clamp only makes p = 0 terms exactly 0 (never 0 * inf).
    lc = logp.clamp_min(-1e4)
    plogp = p * lc
    ent = -plogp.sum(-1)  # nats
    vent = ((plogp * lc).sum(-1) - ent * ent).clamp_min(0.0)
    return logp, ent / LN2, vent / (LN2 * LN2)


def attention_metrics(stats: list[HeadStats], batch: int, device) -> torch.Tensor:
    """[B, 4] (attn_entropy, attn_entropy_var, agreement, interaction) averaged over layers."""
    if not stats:
        return torch.zeros(batch, 4, device=device)
    per_layer = [torch.stack([s.entropy.mean(-1), s.entropy.var(-1, unbiased=False),
                              s.deviation.mean(-1), s.interaction.mean(-1)], -1) for s in stats]
    return torch.stack(per_layer).mean(0)


def top_sorted(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values [B, k] of each row, largest first, equal values by lower id first, and
    their ids. topk alone is not enough: it orders ties, and picks among ties across the k-th
    place, as it likes."""
    V = x.shape[-1]
    if k >= V:
        return x.sort(dim=-1, descending=True, stable=True)
    if x.device.type == "cpu":  # a host read is free here: mend only the rows a tie crosses
        vals, ids = x.topk(k + 1, dim=-1)
        ids = ids[:, :k]
        tied = (vals[:, k - 1] == vals[:, k]).nonzero().flatten().tolist()
        if tied:  # bf16-rounded logits tie often: the lowest ids among those equal to the k-th value
            ids = ids.clone()
            for b in tied:
                ids[b] = _lowest_ids_first(x[b], vals[b, k - 1], k)
        ids, perm = ids.sort(dim=-1)
        vals, perm = x.gather(1, ids).sort(dim=-1, descending=True, stable=True)
        return vals, ids.gather(1, perm)
    # Elsewhere a host read would stall the queue: rank unique keys (the value's bits, then the id).
    ids = _order_key(x).topk(k, dim=-1).indices
    return x.gather(1, ids), ids


def _lowest_ids_first(row: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """The k ids of one row [V] above its k-th value `kth`, then those equal to it by lower id."""
    above = (row > kth).nonzero().flatten()
    return torch.cat([above, (row == kth).nonzero().flatten()[:k - above.numel()]])


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys [B, V] in the order of (value, -id): fp32 bits, negatives flipped so that they
    count up like the values, with the id below them."""
    bits = (x.float() + 0.0).view(torch.int32)  # + 0.0 makes -0.0 the 0.0 it equals
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    shift = max(x.shape[-1] - 1, 1).bit_length()
    return (bits.long() << shift) - torch.arange(x.shape[-1], device=x.device)


def filter_sorted(vals: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Log-probabilities [B, K] over candidates sorted most likely first, after temperature,
    top-k, top-p and min-p (-inf where removed). Parameters are [B] tensors or numbers;
    top_k <= 0, top_p 1 and min_p 0 switch a filter off."""
    B, K = vals.shape
    dev = vals.device
    t = torch.as_tensor(temperature, dtype=torch.float32, device=dev).clamp_min(1e-6)
    x = vals.float() / (t[:, None] if t.dim() else t)
    rank = torch.arange(K, device=dev)[None, :]
    k = torch.as_tensor(top_k, device=dev)
    k = k[:, None] if k.dim() else k
    keep = (k <= 0) | (rank < k)
    x = x.masked_fill(~keep, float("-inf"))
    probs = x.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above this candidate: top-p keeps the head
    p = torch.as_tensor(top_p, dtype=torch.float32, device=dev)
    m = torch.as_tensor(min_p, dtype=torch.float32, device=dev)
    keep = keep & ((before < (p[:, None] if p.dim() else p)) | (rank == 0))
    keep = keep & (probs >= (m[:, None] if m.dim() else m) * probs[:, :1])
    return x.masked_fill(~keep, float("-inf")).log_softmax(-1)


def draw_sorted(logq: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Positions [B, N] drawn from exp(logq) [B, K] with the uniforms u [B, N] (inverse CDF).

    Removed candidates have probability 0, so the cumulative sum is flat over them and no
    uniform lands there.
    """
    cdf = logq.exp().cumsum(-1)  # [B, K]
    x = u.float().clamp(max=_U_MAX) * cdf[:, -1:]  # [B, N]
    return (cdf[:, None, :] <= x[:, :, None]).sum(-1).clamp(max=logq.shape[-1] - 1)


def sample_tokens(policy: Sample, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Plain sampling: the group shares one SamplingParams."""
    p = policy.params
    # the k most likely are all the filters can keep: no full sort
    vals, idx = top_sorted(logits, p.top_k if p.top_k > 0 else logits.shape[-1])
    logq = filter_sorted(vals, p.temperature, 0, p.top_p, p.min_p)
    return idx.gather(1, draw_sorted(logq, u[:, :1]))[:, 0]


def ranked_tokens(logits: torch.Tensor, ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CoT: rank r >= 0 takes the r-th most likely token (state 0), rank -1 the argmax
    (state 1); k > every rank (known on the host, so no device read)."""
    top = top_sorted(logits, max(k, 1))[1]  # [B, k]
    pick = top.gather(1, ranks.clamp_min(0)[:, None])[:, 0]
    return pick, (ranks < 0).long()


def entropix_plan(table: tuple[torch.Tensor, ...], policy: Entropix, H, V, attn, pause_ok=None):
    """Per-row regime codes and (temperature, top_k, top_p, min_p) from the regime table.

    Flowing rows get top_k 1, so sampling them is the argmax.
    """
    c, t = policy.config, table
    feats = torch.cat([torch.ones_like(H)[:, None], H[:, None], V[:, None], attn.float()], 1)  # [B, 7]
    flowing = (H < c.low_ent) & (V < c.low_vent)
    treading = (H >= c.high_ent) & (V < c.med_vent)
    fork = V >= c.high_vent
    # priority: flowing, treading (pause when allowed), branch / resample, adaptive
    code = torch.where(fork, BRANCH + (H >= c.med_ent).long(), torch.full_like(H, ADAPTIVE, dtype=torch.long))
    tread = TREADING if pause_ok is None else TREADING + pause_ok.long()  # TREADING + 1 == PAUSE
    code = torch.where(treading, tread, code).masked_fill(flowing, FLOWING)
    raw = feats @ t["W"]  # [B, 20]
    raw = torch.clamp(torch.where(t["is_int"], (raw + t["off"]).floor(), raw), t["lo"], t["hi"])
    cols = len(EntropixTable.COLUMNS)
    params = raw.view(-1, 4, cols).gather(2, t["code_to_col"][code].long().view(-1, 1, 1).expand(-1, 4, 1))[..., 0]
    return code, params[:, 0], params[:, 1].long(), params[:, 2], params[:, 3]


def entropix_score(logq, model_logp, entropy, weight: float) -> torch.Tensor:
    """Best-of-N score of candidates [B, N]: log-probability under the adapted distribution
    minus a typicality penalty |surprisal in bits - entropy|, which differs per candidate
    (the original added one constant to all)."""
    return logq - weight * (-model_logp / LN2 - entropy[:, None]).abs()


def entropix_tokens(table, policy: Entropix, vals, idx, H, V, attn, u, prev=None, ok=None):
    """The entropix sampler for a group: (tokens [B], codes [B]).

    vals, idx [B, K]: the max_top_k most likely tokens' log-probabilities (most likely
    first) and ids: every regime keeps at most that many, so they are all it looks at.
    prev [B] bool: the previous token is the pause token; ok [B] bool: a pause may be
    inserted now. None when no row of the group has one (known on the host, so the
    pause ops are skipped).
    """
    c, pid = policy.config, policy.pause_id
    code, temp, top_k, top_p, min_p = entropix_plan(table, policy, H, V, attn, ok)
    logp = vals
    if prev is not None:  # never the pause token twice in a row: it goes behind every other candidate
        hit = prev[:, None] & (idx == pid)
        order = hit.to(torch.uint8).argsort(dim=-1, stable=True)  # keeps "most likely first" for the rest
        vals = vals.masked_fill(hit, float("-inf")).gather(1, order)
        idx, logp = idx.gather(1, order), logp.gather(1, order)
    logq = filter_sorted(vals, temp, top_k, top_p, min_p)  # [B, K]; flowing rows keep only their argmax
    cand = draw_sorted(logq, u)  # [B, N] positions in [0, K)
    pick = cand[:, 0]
    if cand.shape[1] > 1:
        score = entropix_score(logq.gather(1, cand), logp.gather(1, cand), H, c.typicality_weight)
        pick = torch.where(code == ADAPTIVE, cand.gather(1, score.argmax(-1, keepdim=True))[:, 0], pick)
    tokens = idx.gather(1, pick[:, None])[:, 0]
    if ok is not None:
        tokens = tokens.masked_fill(code == PAUSE, pid)
    return tokens, code


def entropix_table_tensors(policy: Entropix, device) -> dict[str, torch.Tensor]:
    """The policy's table arrays (`backends.base.entropix_arrays`) on the device."""
    return {k: torch.as_tensor(v, device=device) for k, v in entropix_arrays(policy).items()}

"""The sampler's device maths in MLX: metrics, filters, draws and the policies.

The twin of `backends/torch/ops.py`, function for function: every function works on a
group of rows at once with per-row parameters, and the random draws come from the host
(uniforms [B, N]), so the same uniforms give the same decisions as the PyTorch backend
(`sampler/reference.py` is the float64 definition both are held to).
"""

from __future__ import annotations

import math

import mlx.core as mx

from ...sampler.policy import ADAPTIVE, BRANCH, FLOWING, PAUSE, TREADING, Entropix, EntropixTable, Sample
from ..base import entropix_arrays
from .model import HeadStats
from .sums import rowsum

LN2 = math.log(2.0)
_U_MAX = 1.0 - 2.0 ** -24  # a float32 uniform that rounds to 1 would pick past the last kept token
NEG = -float("inf")


def _logit_metrics(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    x = logits.astype(mx.float32)
    m = mx.max(x, axis=-1, keepdims=True)
    m = mx.where(mx.isinf(m), 0.0, m)  # a row of -inf stays -inf (never inf - inf)
    # the normaliser by blocks as well: mx.logsumexp's one-after-another fp32 sum is ~8e-4 off
    # over 262144 tokens, which moves every log-probability by that much
    logp = x - m - mx.log(rowsum(mx.exp(x - m)))[:, None]
    p = mx.exp(logp)
    lc = mx.maximum(logp, -1e4)  # any p > 0 in fp32 has log p >= -104: only p = 0 terms become exactly 0
    ent = -rowsum(p * lc)  # nats
    # sum p (log p + H)^2 directly: E[(log p)^2] - H^2 (the torch twin's one pass) cancels
    # to ~1e-4 in fp32 at this vocabulary size, and an extra pass costs little here
    vent = rowsum(p * mx.square(lc + ent[:, None]))
    return logp, ent / LN2, vent / (LN2 * LN2)


# One fused pass over [B, V] instead of a kernel per elementwise op (benchmarks/bench_mlx.py).
_compiled_metrics = mx.compile(_logit_metrics)


def logit_metrics(logits: mx.array, compiled: bool = True) -> tuple[mx.array, mx.array, mx.array]:
    """(log-probabilities [B, V], entropy [B], varentropy [B]) in bits."""
    return (_compiled_metrics if compiled else _logit_metrics)(logits)


def top_sorted(x: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest values [B, k] of each row, largest first, equal values by lower id first, and
    their indices. Partition and sort run on unique keys: argpartition picks among ties across the
    k-th place as it likes."""
    k = min(k, x.shape[-1])
    key = -_order_key(x)  # ascending key: descending value, then ascending id
    if k == x.shape[-1]:
        idx = mx.argsort(key, axis=-1)
    else:
        idx = mx.argpartition(key, kth=k - 1, axis=-1)[:, :k]
        idx = mx.take_along_axis(idx, mx.argsort(mx.take_along_axis(key, idx, axis=-1), axis=-1), axis=-1)
    return mx.take_along_axis(x, idx, axis=-1), idx.astype(mx.int32)


def _order_key(x: mx.array) -> mx.array:
    """int64 keys [B, V] in the order of (value, -id): fp32 bits, negatives flipped so that they
    count up like the values, with the id below them."""
    V = x.shape[-1]
    bits = mx.view(mx.where(x == 0, 0.0, x.astype(mx.float32)), mx.int32)  # -0.0 is the 0.0 it equals
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.astype(mx.int64) << max(V - 1, 1).bit_length()) - mx.arange(V, dtype=mx.int64)


def attention_metrics(stats: list[HeadStats], batch: int) -> mx.array:
    """[B, 4] (attn_entropy, attn_entropy_var, agreement, interaction) averaged over layers."""
    if not stats:
        return mx.zeros((batch, 4), dtype=mx.float32)
    per_layer = [mx.stack([s.entropy.mean(-1), s.entropy.var(-1), s.deviation.mean(-1), s.interaction.mean(-1)], -1)
                 for s in stats]
    return mx.stack(per_layer).mean(0)


def _col(x, dtype=mx.float32) -> mx.array:
    """A per-row parameter as a [B, 1] column, or a number as a scalar array."""
    a = x if isinstance(x, mx.array) else mx.array(x)
    a = a.astype(dtype)
    return a[:, None] if a.ndim else a


def filter_sorted(vals: mx.array, temperature, top_k, top_p, min_p) -> mx.array:
    """Log-probabilities [B, K] over candidates sorted most likely first, after temperature,
    top-k, top-p and min-p (-inf where removed); top_k <= 0, top_p 1, min_p 0 switch one off."""
    K = vals.shape[1]
    x = vals.astype(mx.float32) / mx.maximum(_col(temperature), 1e-6)
    rank = mx.arange(K)[None, :]
    k = _col(top_k, mx.int32)
    keep = (k <= 0) | (rank < k)
    x = mx.where(keep, x, NEG)
    probs = mx.softmax(x, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above this candidate: top-p keeps the head
    keep = keep & ((before < _col(top_p)) | (rank == 0))
    keep = keep & (probs >= _col(min_p) * probs[:, :1])
    x = mx.where(keep, x, NEG)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def draw_sorted(logq: mx.array, u: mx.array) -> mx.array:
    """Positions [B, N] drawn from exp(logq) [B, K] with the uniforms u [B, N] (inverse CDF)."""
    cdf = mx.cumsum(mx.exp(logq), axis=-1)  # [B, K]
    x = mx.minimum(u.astype(mx.float32), _U_MAX) * cdf[:, -1:]  # [B, N]
    n = (cdf[:, None, :] <= x[:, :, None]).astype(mx.int32).sum(-1)
    return mx.minimum(n, logq.shape[-1] - 1)


def sample_tokens(policy: Sample, logits: mx.array, u: mx.array) -> mx.array:
    """Plain sampling: the group shares one SamplingParams."""
    p = policy.params
    vals, idx = top_sorted(logits.astype(mx.float32), p.top_k if p.top_k > 0 else logits.shape[-1])
    logq = filter_sorted(vals, p.temperature, 0, p.top_p, p.min_p)
    return mx.take_along_axis(idx, draw_sorted(logq, u[:, :1]), axis=1)[:, 0]


def ranked_tokens(logits: mx.array, ranks: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """CoT: rank r >= 0 takes the r-th most likely token (state 0), rank -1 the argmax (state 1)."""
    _, top = top_sorted(logits, max(k, 1))
    pick = mx.take_along_axis(top, mx.maximum(ranks, 0)[:, None], axis=1)[:, 0]
    return pick, (ranks < 0).astype(mx.int32)


def entropix_table_arrays(policy: Entropix) -> dict[str, mx.array]:
    """The policy's table arrays (`backends.base.entropix_arrays`) as MLX arrays."""
    return {k: mx.array(v) for k, v in entropix_arrays(policy).items()}


def entropix_plan(table: tuple[mx.array, ...], policy: Entropix, H, V, attn, pause_ok=None):
    """Per-row regime codes and (temperature, top_k, top_p, min_p) from the regime table."""
    c, t = policy.config, table
    feats = mx.concatenate([mx.ones_like(H)[:, None], H[:, None], V[:, None], attn.astype(mx.float32)], 1)  # [B, 7]
    flowing = (H < c.low_ent) & (V < c.low_vent)
    treading = (H >= c.high_ent) & (V < c.med_vent)
    fork = V >= c.high_vent
    # priority: flowing, treading (pause when allowed), branch / resample, adaptive
    code = mx.where(fork, BRANCH + (H >= c.med_ent).astype(mx.int32), ADAPTIVE)
    tread = TREADING if pause_ok is None else TREADING + pause_ok.astype(mx.int32)  # TREADING + 1 == PAUSE
    code = mx.where(flowing, FLOWING, mx.where(treading, tread, code)).astype(mx.int32)
    raw = feats @ t["W"]  # [B, 20]
    raw = mx.clip(mx.where(t["is_int"], mx.floor(raw + t["off"]), raw), t["lo"], t["hi"])
    cols = len(EntropixTable.COLUMNS)
    col = t["code_to_col"][code]  # [B]
    params = mx.take_along_axis(raw.reshape(-1, 4, cols), mx.broadcast_to(col[:, None, None], (col.shape[0], 4, 1)),
                                axis=2)[..., 0]
    return code, params[:, 0], params[:, 1].astype(mx.int32), params[:, 2], params[:, 3]


def entropix_score(logq, model_logp, entropy, weight: float) -> mx.array:
    """Best-of-N score of candidates [B, N]: log-probability under the adapted distribution
    minus a typicality penalty |surprisal in bits - entropy|."""
    return logq - weight * mx.abs(-model_logp / LN2 - entropy[:, None])


def entropix_tokens(table, policy: Entropix, vals, idx, H, V, attn, u, prev=None, ok=None):
    """The entropix sampler for a group: (tokens [B], codes [B]); see the torch twin."""
    c, pid = policy.config, policy.pause_id
    code, temp, top_k, top_p, min_p = entropix_plan(table, policy, H, V, attn, ok)
    logp = vals
    if prev is not None:  # never the pause token twice in a row: it goes behind every other candidate
        hit = prev[:, None] & (idx == pid)
        K = idx.shape[1]
        order = mx.argsort(hit.astype(mx.int32) * K + mx.arange(K), axis=-1)  # unique keys: the rest keep their order
        vals, idx, logp = (mx.take_along_axis(a, order, axis=1) for a in (mx.where(hit, NEG, vals), idx, logp))
    logq = filter_sorted(vals, temp, top_k, top_p, min_p)  # flowing rows keep only their argmax
    cand = draw_sorted(logq, u)  # [B, N] positions in [0, K)
    pick = cand[:, 0]
    if cand.shape[1] > 1:
        score = entropix_score(mx.take_along_axis(logq, cand, axis=1), mx.take_along_axis(logp, cand, axis=1), H,
                               c.typicality_weight)
        best = mx.take_along_axis(cand, mx.argmax(score, axis=-1)[:, None], axis=1)[:, 0]
        pick = mx.where(code == ADAPTIVE, best, pick)
    tokens = mx.take_along_axis(idx, pick[:, None], axis=1)[:, 0]
    if ok is not None:
        tokens = mx.where(code == PAUSE, pid, tokens)
    return tokens, code

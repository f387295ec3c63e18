"""The sampler's device maths in MLX: metrics, filters, draws and the policies.

The twin of `backends/torch/ops.py`, function for function: every function works on a
group of rows at once with per-row parameters, and the random draws come from the host
(uniforms [B, N]), so the same uniforms give the same decisions as the PyTorch backend.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ...sampler.policy import ADAPTIVE, BRANCH, FLOWING, PAUSE, TREADING, Entropix, EntropixTable, Sample
from .model import HeadStats
from .sums import rowsum

LN2 = math.log(2.0)
_U_MAX = 1.0 - 2.0 ** -24  # a float32 uniform that rounds to 1 would pick past the last kept token
NEG = -float("inf")


def _logit_metrics(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
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
    """The k largest values [B, k] of each row, largest first, and their indices."""
    k = min(k, x.shape[-1])
    if k == x.shape[-1]:
        idx = mx.argsort(-x, axis=-1)
    else:
        idx = mx.argpartition(-x, kth=k - 1, axis=-1)[:, :k]
        order = mx.argsort(-mx.take_along_axis(x, idx, axis=-1), axis=-1)
        idx = mx.take_along_axis(idx, order, axis=-1)
    return mx.take_along_axis(x, idx, axis=-1), idx.astype(mx.int32)


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


def entropix_table_arrays(policy: Entropix) -> tuple[mx.array, ...]:
    t = policy.table()
    return (mx.array(t.weights, dtype=mx.float32), mx.array(t.lower, dtype=mx.float32),
            mx.array(t.upper, dtype=mx.float32), mx.array(t.is_int), mx.array(t.offset, dtype=mx.float32),
            mx.array(t.code_to_column, dtype=mx.int32))


def entropix_plan(table: tuple[mx.array, ...], policy: Entropix, H, V, attn, pause_ok=None):
    """Per-row state codes and (temperature, top_k, top_p, min_p) from the strategy table."""
    c = policy.config
    W, lo, hi, is_int, off, code_to_col = table
    feats = mx.concatenate([mx.ones_like(H)[:, None], H[:, None], V[:, None], attn.astype(mx.float32)], 1)  # [B, 7]
    flowing = (H < c.low_ent) & (V < c.low_vent)
    treading = (H >= c.high_ent) & (V < c.med_vent)
    fork = V >= c.high_vent
    # priority: flowing, treading (pause when allowed), branch / resample, adaptive
    code = mx.where(fork, BRANCH + (H >= c.med_ent).astype(mx.int32), ADAPTIVE)
    tread = TREADING if pause_ok is None else TREADING + pause_ok.astype(mx.int32)  # TREADING + 1 == PAUSE
    code = mx.where(flowing, FLOWING, mx.where(treading, tread, code)).astype(mx.int32)
    raw = feats @ W  # [B, 20]
    raw = mx.clip(mx.where(is_int, mx.floor(raw + off), raw), lo, hi)
    cols = len(EntropixTable.COLUMNS)
    col = code_to_col[code]  # [B]
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
    if prev is not None:  # never the pause token twice in a row, whichever strategy
        vals = mx.where(prev[:, None] & (idx == pid), NEG, vals)
        order = mx.argsort(-vals, axis=-1)  # keep "most likely first": top-1 must not be the pause
        vals, idx, logp = (mx.take_along_axis(a, order, axis=1) for a in (vals, idx, logp))
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

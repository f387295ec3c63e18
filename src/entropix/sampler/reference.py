"""The sampler's maths in float64 numpy: the one definition that every backend's ops match.

The backends (`backends/{torch,jax,mlx}/ops.py`, and `adapters/ops.py` for engines that hand
us logits) compute the same functions batched, in float32 and in their own array idiom;
tests/test_conformance.py holds each of them to this module: the same tokens and regime
codes, metrics within a stated tolerance. This module is short and slow on purpose.

Conventions every backend follows:
  * rows are the first axis; per-row parameters are numbers or [B] arrays;
  * candidates are ranked by their logits, most likely first, equal logits by lower token
    id first (a logit order is exact in any precision, where log-probabilities may round
    two logits together);
  * random draws come from the host as uniforms in [0, 1): one inverse-CDF search each;
  * entropy and varentropy are in bits.

The entropix regime codes live here because the regime function below defines them;
`sampler.policy` re-exports them with the regime table.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

LN2 = math.log(2.0)
U_MAX = 1.0 - 2.0 ** -24  # the largest float32 below 1: a uniform that rounds up to 1 would pick past the last kept token

ENTROPIX_REGIMES = ("flowing", "treading", "pause", "branch", "resample", "adaptive")
FLOWING, TREADING, PAUSE, BRANCH, RESAMPLE, ADAPTIVE = range(len(ENTROPIX_REGIMES))


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _col(x, rows: int) -> np.ndarray:
    """A per-row parameter (a number or [B]) as a [B, 1] column."""
    return np.broadcast_to(_f64(x).reshape(-1, 1), (rows, 1))


def _take(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, pos, -1)


# -- metrics ---------------------------------------------------------------------------------

def log_softmax(x) -> np.ndarray:
    """Row-wise log-probabilities [B, V]; -inf logits stay -inf."""
    x = np.atleast_2d(_f64(x))
    m = x.max(-1, keepdims=True)
    z = x - np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def logit_metrics(logits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probabilities [B, V], entropy [B], varentropy [B]): H = -sum p log2 p and
    V = sum p (log2 p + H)^2, the variance of the surprisal in bits."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    lp2 = np.where(p > 0, logp / LN2, 0.0)  # an impossible token weighs nothing (never 0 * inf)
    H = -(p * lp2).sum(-1)
    V = (p * (lp2 + H[:, None]) ** 2).sum(-1)
    return logp, H, V


def rank(x) -> np.ndarray:
    """Token ids [B, V] by value, largest first, equal values by lower id first."""
    return np.argsort(-np.atleast_2d(_f64(x)), axis=-1, kind="stable")


def top(x, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values [B, k] of each row in `rank` order, and their ids."""
    x = np.atleast_2d(_f64(x))
    ids = rank(x)[:, :k]
    return _take(x, ids), ids


def margin(logp) -> np.ndarray:
    """[B] probability of the most likely token minus that of the second (CoT's confidence)."""
    two = top(logp, 2)[0]
    return np.exp(two[:, 0]) - np.exp(two[:, 1])


def attention_metrics(stats: Sequence[Sequence[Any]], batch: int) -> np.ndarray:
    """[B, 4] (attn_entropy, attn_entropy_var, agreement, interaction) from each captured layer's
    per-head (entropy, deviation, interaction) [B, heads]: the mean over heads (and the entropy's
    variance across them), then the mean over layers; zeros when nothing was captured."""
    if not stats:
        return np.zeros((batch, 4))
    per_layer = [np.stack([e.mean(-1), e.var(-1), d.mean(-1), i.mean(-1)], -1)
                 for e, d, i in ((_f64(a) for a in s) for s in stats)]
    return np.mean(per_layer, axis=0)


# -- filters and draws -----------------------------------------------------------------------

def filter_sorted(vals, temperature, top_k, top_p, min_p) -> np.ndarray:
    """Log-probabilities [B, K] over candidates sorted most likely first after temperature, then
    top-k (by rank), top-p (a candidate stays while the mass strictly above it is below top_p;
    the first always stays) and min-p (against the first), both measured after top-k; -inf where
    removed. top_k <= 0, top_p 1 and min_p 0 switch a filter off."""
    x = np.atleast_2d(_f64(vals))
    B, K = x.shape
    x = x / np.maximum(_col(temperature, B), 1e-6)
    pos = np.arange(K)[None, :]
    k = _col(top_k, B)
    keep = (k <= 0) | (pos < k)
    probs = np.exp(log_softmax(np.where(keep, x, -np.inf)))
    before = np.cumsum(probs, -1) - probs
    keep &= (before < _col(top_p, B)) | (pos == 0)
    keep &= probs >= _col(min_p, B) * probs[:, :1]
    return log_softmax(np.where(keep, x, -np.inf))


def draw_sorted(logq, u) -> np.ndarray:
    """Positions [B, N] drawn from exp(logq) [B, K] with the uniforms u [B, N] (inverse CDF): the
    number of cumulative masses at or below u times the total. Removed candidates add no mass, so
    no draw lands on them."""
    cdf = np.cumsum(np.exp(_f64(logq)), -1)
    x = np.minimum(_f64(u), U_MAX) * cdf[:, -1:]
    return np.minimum((cdf[:, None, :] <= x[:, :, None]).sum(-1), cdf.shape[-1] - 1)


def sample_tokens(params: Any, logits, u) -> np.ndarray:
    """Plain sampling, one SamplingParams for the group: tokens [B] from the first uniform of each row."""
    x = np.atleast_2d(_f64(logits))
    vals, ids = top(x, params.top_k if params.top_k > 0 else x.shape[-1])
    logq = filter_sorted(vals, params.temperature, 0, params.top_p, params.min_p)
    return _take(ids, draw_sorted(logq, _f64(u)[:, :1]))[:, 0]


def ranked_tokens(logits, ranks) -> tuple[np.ndarray, np.ndarray]:
    """CoT: rank r >= 0 takes the r-th most likely token (regime 0), rank -1 the argmax (regime 1)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    ids = rank(logits)
    return ids[np.arange(len(ranks)), np.maximum(ranks, 0)], (ranks < 0).astype(np.int64)


# -- entropix -----------------------------------------------------------------------------------

def entropix_regimes(c: Any, entropy, varentropy, pause_ok=None) -> np.ndarray:
    """Each row's regime code from H and V (bits) and the config's thresholds, in priority order:
    flowing, treading (pause where one may be inserted), branch or resample, else adaptive."""
    H, V = _f64(entropy), _f64(varentropy)
    code = np.where(V >= c.high_vent, BRANCH + (H >= c.med_ent), ADAPTIVE)
    tread = TREADING if pause_ok is None else TREADING + np.asarray(pause_ok, dtype=np.int64)  # + 1: PAUSE
    code = np.where((H >= c.high_ent) & (V < c.med_vent), tread, code)
    return np.where((H < c.low_ent) & (V < c.low_vent), FLOWING, code).astype(np.int64)


def entropix_params(table: Any, code, H, V, attn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's (temperature, top_k, top_p, min_p) from its regime's column of the regime table
    (`policy.EntropixTable`): affine in [1, H, V, attn (4)], integer columns floored after their
    offset, then clamped."""
    H, V = _f64(H), _f64(V)
    B = len(H)
    feats = np.concatenate([np.ones((B, 1)), H[:, None], V[:, None], _f64(attn).reshape(B, 4)], 1)
    raw = feats @ _f64(table.weights)  # [B, 4 * regimes]
    raw = np.where(table.is_int, np.floor(raw + _f64(table.offset)), raw)
    raw = np.clip(raw, table.lower, table.upper)
    col = np.asarray(table.code_to_column)[np.asarray(code)]
    p = raw.reshape(B, 4, -1)[np.arange(B), :, col]
    return p[:, 0], p[:, 1].astype(np.int64), p[:, 2], p[:, 3]


def entropix_plan(policy: Any, H, V, attn=None, pause_ok=None):
    """(code, temperature, top_k, top_p, min_p) per row for an `Entropix` policy; attn None: zeros."""
    code = entropix_regimes(policy.config, H, V, pause_ok)
    attn = np.zeros((len(code), 4)) if attn is None else attn
    return (code, *entropix_params(policy.table(), code, H, V, attn))


def entropix_score(logq, model_logp, entropy, weight: float) -> np.ndarray:
    """Best-of-N score of candidates [B, N]: log-probability under the adapted distribution minus
    weight * |surprisal under the model (bits) - entropy|."""
    return _f64(logq) - weight * np.abs(-_f64(model_logp) / LN2 - _f64(entropy)[:, None])


def entropix_tokens(policy: Any, top_logp, top_ids, H, V, u, attn=None, prev=None, ok=None):
    """The entropix sampler: (tokens [B], codes [B]) from the max_top_k most likely tokens'
    log-probabilities and ids [B, K] (`top` order) and N uniforms per row [B, N].

    prev [B] bool: the previous token was the pause token, which then goes behind every other
    candidate (never twice in a row). ok [B] bool: a pause may be inserted now (treading rows
    become pause rows and take the pause token). Adaptive rows keep the best-scoring of their N
    candidates, every other row its first draw.
    """
    code, temp, k, p, m = entropix_plan(policy, H, V, attn, ok)
    vals = logp = _f64(top_logp)
    ids = np.asarray(top_ids)
    if prev is not None:
        hit = np.asarray(prev)[:, None] & (ids == policy.pause_id)
        order = np.argsort(hit, axis=-1, kind="stable")
        vals, ids, logp = (_take(a, order) for a in (np.where(hit, -np.inf, vals), ids, logp))
    logq = filter_sorted(vals, temp, k, p, m)
    cand = draw_sorted(logq, u)
    pick = cand[:, 0]
    if cand.shape[1] > 1:
        score = entropix_score(_take(logq, cand), _take(logp, cand), H, policy.config.typicality_weight)
        pick = np.where(code == ADAPTIVE, _take(cand, score.argmax(-1)[:, None])[:, 0], pick)
    tokens = _take(ids, pick[:, None])[:, 0]
    return np.where(code == PAUSE, policy.pause_id, tokens).astype(np.int64), code

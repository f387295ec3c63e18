"""The logits-only sampler maths in numpy, for engines that hand us next-token logits.

The twin of `backends/torch/ops.py` for the policies that need no attention (greedy,
sampling, CoT ranks and entropix without attention metrics), in float32 like the torch
ops, so that the same logits and the same host uniforms give the same token (the float64
definition is `sampler/reference.py`). The regime codes come from the reference's
`entropix_regimes` and the parameters from the same regime table. llama.cpp and mlx-lm
adapters use it; the transformers adapter runs the torch ops themselves.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..backends.base import SampleGroup, StepHost, candidates, pause_flags, policy_op, ranking_width, step_blocks
from ..sampler.policy import ADAPTIVE, PAUSE, Entropix, EntropixTable, Greedy, Ranked, Sample
from ..sampler.reference import entropix_regimes

LN2 = math.log(2.0)
_U_MAX = np.float32(1.0 - 2.0 ** -24)
_F = np.float32


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(_F, copy=False)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, _F(0))
    z = x - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(-1, keepdims=True, dtype=_F))


def moments(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-normaliser [B], entropy [B], varentropy [B]) in bits, without forming p or log p:
    with z = x - max(x) and e = exp(z), H = log sum e - E[z] and V = E[z^2] - E[z]^2 (the
    variance of the surprisal, which a shift leaves alone). log p = x - normaliser is only
    taken where it is needed (the top candidates, the chosen token): at one row per step
    the passes over the vocabulary are the sampler's whole cost next to the model."""
    x = np.atleast_2d(logits).astype(_F, copy=False)
    m = x.max(-1, keepdims=True)
    z = x - m
    np.maximum(z, _F(-1e4), out=z)  # -inf logits: e = 0 and e * z = 0, never 0 * inf
    e = np.exp(z)
    s = e.sum(-1, dtype=_F)
    ez = e * z
    mean = ez.sum(-1, dtype=_F) / s
    mean2 = np.einsum("ij,ij->i", ez, z) / s
    H = (np.log(s) - mean) / _F(LN2)
    V = np.maximum(mean2 - mean * mean, _F(0)) / _F(LN2 * LN2)
    return m[:, 0] + np.log(s), H, V


def logit_metrics(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probabilities [B, V], entropy [B], varentropy [B]) in bits, as the torch ops."""
    x = np.atleast_2d(logits).astype(_F, copy=False)
    norm, H, V = moments(x)
    return x - norm[:, None], H, V


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values [B, k] and their ids, most likely first, equal values by lower id first."""
    V = logp.shape[-1]
    k = min(k, V)
    if k == V:
        ids = np.argsort(-logp, axis=-1, kind="stable")
        return np.take_along_axis(logp, ids, -1), ids
    part = np.argpartition(-logp, k, axis=-1)[:, :k + 1]  # the k largest, then the (k+1)-th
    after = np.take_along_axis(logp, part[:, k:], -1)[:, 0]
    part = np.sort(part[:, :k], -1)  # by id: the stable sort below then puts equal values lower id first
    vals = np.take_along_axis(logp, part, -1)
    ids = np.take_along_axis(part, np.argsort(-vals, axis=-1, kind="stable"), -1)
    tied = vals.min(-1) == after  # argpartition picks among ties across the k-th place as it likes
    if tied.any():
        ids[tied] = np.argsort(-logp[tied], axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(logp, ids, -1), ids


def _col(x, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(x, dtype=_F).reshape(-1, 1) if np.ndim(x) else np.asarray(x, dtype=_F), (n, 1))


def filter_sorted(vals: np.ndarray, temperature, top_k_, top_p, min_p) -> np.ndarray:
    """Log-probabilities [B, K] over sorted candidates after temperature, top-k, top-p and
    min-p (-inf where removed); top_k <= 0, top_p 1 and min_p 0 switch a filter off."""
    B, K = vals.shape
    x = vals.astype(_F) / np.maximum(_col(temperature, B), _F(1e-6))
    rank = np.arange(K)[None, :]
    k = np.broadcast_to(np.asarray(top_k_).reshape(-1, 1) if np.ndim(top_k_) else np.asarray(top_k_), (B, 1))
    keep = (k <= 0) | (rank < k)
    x = np.where(keep, x, -np.inf).astype(_F)
    probs = np.exp(log_softmax(x))
    before = np.cumsum(probs, -1, dtype=_F) - probs  # mass strictly above: top-p keeps the head
    keep &= (before < _col(top_p, B)) | (rank == 0)
    keep &= probs >= _col(min_p, B) * probs[:, :1]
    return log_softmax(np.where(keep, x, -np.inf).astype(_F))


def draw_sorted(logq: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Positions [B, N] drawn from exp(logq) [B, K] with uniforms u [B, N] (inverse CDF)."""
    cdf = np.cumsum(np.exp(logq), -1, dtype=_F)
    x = np.minimum(u.astype(_F), _U_MAX) * cdf[:, -1:]
    return np.minimum((cdf[:, None, :] <= x[:, :, None]).sum(-1), logq.shape[-1] - 1)


def entropix_plan(policy: Entropix, H, V, attn=None, pause_ok=None):
    """Regime codes [B] (the host reference) and each row's (temperature, top_k, top_p, min_p)."""
    t: EntropixTable = policy.table()
    B = len(H)
    code = entropix_regimes(policy.config, H, V, pause_ok)
    attn = np.zeros((B, 4), dtype=_F) if attn is None else attn.astype(_F)
    feats = np.concatenate([np.ones((B, 1), _F), H.reshape(-1, 1).astype(_F), V.reshape(-1, 1).astype(_F), attn], 1)
    raw = feats @ np.asarray(t.weights, dtype=_F)  # [B, 20]
    raw = np.where(np.asarray(t.is_int), np.floor(raw + np.asarray(t.offset, dtype=_F)), raw)
    raw = np.clip(raw, np.asarray(t.lower, dtype=_F), np.asarray(t.upper, dtype=_F))
    cols = len(EntropixTable.COLUMNS)
    col = np.asarray(t.code_to_column)[code]
    params = raw.reshape(B, 4, cols)[np.arange(B), :, col]  # [B, 4]
    return code, params[:, 0], params[:, 1].astype(np.int64), params[:, 2], params[:, 3]


def entropix_score(logq, model_logp, entropy, weight: float) -> np.ndarray:
    """Best-of-N score of candidates [B, N]: log q minus weight * |surprisal (bits) - entropy|."""
    return logq - _F(weight) * np.abs(-model_logp / _F(LN2) - entropy[:, None])


def entropix_tokens(policy: Entropix, vals, idx, H, V, u, prev=None, ok=None, attn=None):
    """The entropix choice for a group: (tokens [B], codes [B]); vals/idx [B, K] are the
    max_top_k most likely log-probabilities and ids. prev: the previous token is the pause
    token; ok: a pause may be inserted now (None when no row has one)."""
    c, pid = policy.config, policy.pause_id
    code, temp, k, p, m = entropix_plan(policy, H, V, attn, ok)
    logp = vals
    if prev is not None:  # never the pause token twice in a row: it goes behind every other candidate
        hit = prev[:, None] & (idx == pid)
        order = np.argsort(hit, axis=-1, kind="stable")
        vals = np.where(hit, -np.inf, vals).astype(_F)
        vals, idx, logp = (np.take_along_axis(a, order, -1) for a in (vals, idx, logp))
    logq = filter_sorted(vals, temp, k, p, m)
    cand = draw_sorted(logq, u)  # [B, N]
    pick = cand[:, 0]
    if cand.shape[1] > 1:
        score = entropix_score(np.take_along_axis(logq, cand, -1), np.take_along_axis(logp, cand, -1), H,
                               c.typicality_weight)
        best = np.take_along_axis(cand, score.argmax(-1)[:, None], -1)[:, 0]
        pick = np.where(code == ADAPTIVE, best, pick)
    tokens = np.take_along_axis(idx, pick[:, None], -1)[:, 0]
    if ok is not None:
        tokens = np.where(code == PAUSE, pid, tokens)
    return tokens.astype(np.int64), code


def sample_tokens(policy: Sample, logp: np.ndarray, u: np.ndarray) -> np.ndarray:
    p = policy.params
    k = p.top_k if p.top_k > 0 else logp.shape[-1]
    vals, idx = top_k(logp, k)
    logq = filter_sorted(vals, p.temperature, 0, p.top_p, p.min_p)
    return np.take_along_axis(idx, draw_sorted(logq, u[:, :1]), -1)[:, 0]


def _greedy(group: SampleGroup, logp, H, V, top_lp, top_id, attn):
    return top_id[:, 0], np.zeros(len(logp), dtype=np.int64)


def _sample(group: SampleGroup, logp, H, V, top_lp, top_id, attn):
    return sample_tokens(group.policy, logp, group.uniforms), np.zeros(len(logp), dtype=np.int64)


def _ranked(group: SampleGroup, logp, H, V, top_lp, top_id, attn):
    r = group.ranks
    ids = top_k(logp, int(r.max()) + 1)[1]
    return ids[np.arange(len(r)), np.maximum(r, 0)], (r < 0).astype(np.int64)


def _entropix(group: SampleGroup, logp, H, V, top_lp, top_id, attn):
    pol = group.policy
    if pol.attention and attn is None:
        raise ValueError("this engine gives logits only: entropix needs attention=False here")
    K = candidates(pol, logp.shape[-1])
    prev, ok = pause_flags(group)
    return entropix_tokens(pol, top_lp[:, :K], top_id[:, :K], H, V, group.uniforms, prev, ok, attn)


OPS = {Greedy: _greedy, Sample: _sample, Ranked: _ranked, Entropix: _entropix}


def choose(group: SampleGroup, logp, H, V, top_lp, top_id, attn=None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, codes) of one group's rows; the arrays hold only the group's rows. logp may
    be the logits (any per-row shift of log p): only top_lp must be log-probabilities."""
    return policy_op(OPS, group.policy, "numpy")(group, logp, H, V, top_lp, top_id, attn)


def sample(logits: np.ndarray, groups: Sequence[SampleGroup], k: int, attn: np.ndarray | None = None) -> StepHost:
    """A Backend's sample() over host logits [B, V]: metrics, each group's policy, top k."""
    x = np.atleast_2d(logits).astype(_F, copy=False)
    norm, H, V = moments(x)
    B = x.shape[0]
    top_x, top_id = top_k(x, ranking_width(groups, k, x.shape[-1]))
    top_lp = top_x - norm[:, None]
    tokens, codes = np.zeros(B, np.int64), np.zeros(B, np.int64)
    for g in groups:  # the policies' filters are shift-invariant: they may read logits for log p
        r = np.asarray(g.rows)
        tokens[r], codes[r] = choose(g, x[r], H[r], V[r], top_lp[r], top_id[r], None if attn is None else attn[r])
    chosen = x[np.arange(B), tokens] - norm
    margin = np.exp(top_lp[:, 0]) - np.exp(top_lp[:, 1])
    blocks = step_blocks(tokens, codes, chosen, H, V, margin, np.zeros((B, 4)) if attn is None else attn,
                         np.full(B, attn is not None), top_id[:, :k], top_lp[:, :k])
    return StepHost.from_matrix(np.concatenate([b.astype(np.float64) for b in blocks], 1), k)

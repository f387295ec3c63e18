"""The logits-only sampler maths in numpy, for engines that hand us next-token logits.

The twin of `backends/torch/ops.py` for the policies that need no attention (greedy,
sampling, CoT ranks and entropix without attention metrics), in float32 like the torch
ops, so that the same logits and the same host uniforms give the same token. The
strategy codes come from the host reference `sampler.policy.entropix_states` and the
parameters from the same strategy table. llama.cpp and mlx-lm adapters use it; the
transformers adapter runs the torch ops themselves.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..backends.base import SampleGroup, StepHost
from ..sampler.policy import ADAPTIVE, PAUSE, Entropix, EntropixTable, Greedy, Ranked, Sample, entropix_states

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
    """The k largest values [B, k] and their ids, most likely first."""
    k = min(k, logp.shape[-1])
    part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, -1), np.take_along_axis(part, order, -1)


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
    """State codes [B] (the host reference) and each row's (temperature, top_k, top_p, min_p)."""
    t: EntropixTable = policy.table()
    B = len(H)
    code = entropix_states(policy.config, H, V, pause_ok)
    attn = np.zeros((B, 4), dtype=_F) if attn is None else attn.astype(_F)
    feats = np.concatenate([np.ones((B, 1), _F), H.reshape(-1, 1).astype(_F), V.reshape(-1, 1).astype(_F), attn], 1)
    raw = feats @ np.asarray(t.weights, dtype=_F)  # [B, 20]
    raw = np.where(np.asarray(t.is_int), np.floor(raw + np.asarray(t.offset, dtype=_F)), raw)
    raw = np.clip(raw, np.asarray(t.lower, dtype=_F), np.asarray(t.upper, dtype=_F))
    cols = len(EntropixTable.COLUMNS)
    col = np.asarray(t.code_to_column)[code]
    params = raw.reshape(B, 4, cols)[np.arange(B), :, col]  # [B, 4]
    return code, params[:, 0], params[:, 1].astype(np.int64), params[:, 2], params[:, 3]


def entropix_tokens(policy: Entropix, vals, idx, H, V, u, prev=None, ok=None, attn=None):
    """The entropix choice for a group: (tokens [B], codes [B]); vals/idx [B, K] are the
    max_top_k most likely log-probabilities and ids. prev: the previous token is the pause
    token; ok: a pause may be inserted now (None when no row has one)."""
    c, pid = policy.config, policy.pause_id
    code, temp, k, p, m = entropix_plan(policy, H, V, attn, ok)
    logp = vals
    if prev is not None:  # never the pause token twice in a row
        vals = np.where(prev[:, None] & (idx == pid), -np.inf, vals).astype(_F)
        order = np.argsort(-vals, axis=-1, kind="stable")
        vals, idx, logp = (np.take_along_axis(a, order, -1) for a in (vals, idx, logp))
    logq = filter_sorted(vals, temp, k, p, m)
    cand = draw_sorted(logq, u)  # [B, N]
    pick = cand[:, 0]
    if cand.shape[1] > 1:
        model_lp = np.take_along_axis(logp, cand, -1)
        score = np.take_along_axis(logq, cand, -1) - _F(c.typicality_weight) * np.abs(-model_lp / _F(LN2) - H[:, None])
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


def choose(group: SampleGroup, logp, H, V, top_lp, top_id, attn=None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, codes) of one group's rows; the arrays hold only the group's rows. logp may
    be the logits (any per-row shift of log p): only top_lp must be log-probabilities."""
    pol, n = group.policy, len(logp)
    zeros = np.zeros(n, dtype=np.int64)
    if isinstance(pol, Greedy):
        return top_id[:, 0], zeros
    if isinstance(pol, Sample):
        return sample_tokens(pol, logp, group.uniforms), zeros
    if isinstance(pol, Ranked):
        r = group.ranks
        ids = top_k(logp, int(r.max()) + 1)[1]
        return ids[np.arange(n), np.maximum(r, 0)], (r < 0).astype(np.int64)
    if isinstance(pol, Entropix):
        if pol.attention and attn is None:
            raise ValueError("this engine gives logits only: entropix needs attention=False here")
        K = min(pol.config.max_top_k, logp.shape[-1])
        prev, ok = (f if f.any() else None for f in (group.flags[:, 0], group.flags[:, 1]))
        return entropix_tokens(pol, top_lp[:, :K], top_id[:, :K], H, V, group.uniforms, prev, ok, attn)
    raise TypeError(f"no numpy ops for policy {type(pol).__name__}")


def sample(logits: np.ndarray, groups: Sequence[SampleGroup], k: int, attn: np.ndarray | None = None) -> StepHost:
    """A Backend's sample() over host logits [B, V]: metrics, each group's policy, top k."""
    x = np.atleast_2d(logits).astype(_F, copy=False)
    norm, H, V = moments(x)
    B = x.shape[0]
    wide = [min(g.policy.config.max_top_k, x.shape[-1]) for g in groups if isinstance(g.policy, Entropix)]
    top_x, top_id = top_k(x, max([k, 2] + wide))
    top_lp = top_x - norm[:, None]
    tokens, codes = np.zeros(B, np.int64), np.zeros(B, np.int64)
    for g in groups:  # the policies' filters are shift-invariant: they may read logits for log p
        r = np.asarray(g.rows)
        tokens[r], codes[r] = choose(g, x[r], H[r], V[r], top_lp[r], top_id[r], None if attn is None else attn[r])
    m = np.zeros((B, 11 + 2 * k))
    m[:, 0], m[:, 1], m[:, 2] = tokens, codes, x[np.arange(B), tokens] - norm
    m[:, 3], m[:, 4] = H, V
    m[:, 5] = np.exp(top_lp[:, 0]) - np.exp(top_lp[:, 1])
    if attn is not None:
        m[:, 6:10], m[:, 10] = attn, 1
    m[:, 11:11 + k], m[:, 11 + k:] = top_id[:, :k], top_lp[:, :k]
    return StepHost.from_matrix(m, k)

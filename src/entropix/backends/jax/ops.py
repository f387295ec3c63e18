"""The sampler's device maths in JAX: metrics, filters, draws and the policies.

The twin of `backends/torch/ops.py`, function for function, written as pure jnp over whole
(padded) batches with per-row parameters. The random draws come from the host (uniforms
[B, N]), so a draw is one inverse-CDF search per row and candidate and gives the same token
as the PyTorch backend for the same uniforms (`sampler/reference.py` is the float64 definition
both are held to). `uniforms_from_keys` is the JAX-native
alternative (explicit `jax.random` keys per row) for code that decodes on the device alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ...sampler.policy import ADAPTIVE, BRANCH, FLOWING, PAUSE, TREADING, EntropixTable

LN2 = math.log(2.0)
_U_MAX = 1.0 - 2.0 ** -24  # a float32 uniform that rounds to 1 would pick past the last kept token
NEG_INF = -jnp.inf


def logit_metrics(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-probabilities [B, V], entropy [B], varentropy [B]) in bits, as in the torch twin."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    lc = jnp.maximum(logp, -1e4)  # p = 0 terms become exactly 0 (never 0 * inf)
    plogp = p * lc
    ent = -plogp.sum(-1)
    vent = jnp.maximum((plogp * lc).sum(-1) - ent * ent, 0.0)
    return logp, ent / LN2, vent / (LN2 * LN2)


def attention_metrics(stats: list[tuple[jax.Array, jax.Array, jax.Array]], batch: int) -> jax.Array:
    """[B, 4] (attn_entropy, attn_entropy_var, agreement, interaction) averaged over layers;
    stats holds (entropy, deviation, interaction) [B, H] per captured layer."""
    if not stats:
        return jnp.zeros((batch, 4), jnp.float32)
    per_layer = [jnp.stack([e.mean(-1), e.var(-1), d.mean(-1), i.mean(-1)], -1) for e, d, i in stats]
    return jnp.stack(per_layer).mean(0)


def _col(x, dtype=jnp.float32):
    """A per-row parameter [B] as a column [B, 1]; a scalar stays a scalar."""
    x = jnp.asarray(x, dtype)
    return x[:, None] if x.ndim else x


def filter_sorted(vals: jax.Array, temperature, top_k, top_p, min_p) -> jax.Array:
    """Log-probabilities [B, K] over candidates sorted most likely first, after temperature,
    top-k, top-p and min-p (-inf where removed); top_k <= 0, top_p 1, min_p 0 switch off."""
    K = vals.shape[-1]
    x = vals.astype(jnp.float32) / jnp.maximum(_col(temperature), 1e-6)
    rank = jnp.arange(K)[None, :]
    k = _col(top_k, jnp.int32)
    keep = (k <= 0) | (rank < k)
    x = jnp.where(keep, x, NEG_INF)
    probs = jax.nn.softmax(x, axis=-1)
    before = jnp.cumsum(probs, -1) - probs  # mass strictly above this candidate
    keep = keep & ((before < _col(top_p)) | (rank == 0))
    keep = keep & (probs >= _col(min_p) * probs[:, :1])
    return jax.nn.log_softmax(jnp.where(keep, x, NEG_INF), axis=-1)


def draw_sorted(logq: jax.Array, u: jax.Array) -> jax.Array:
    """Positions [B, N] drawn from exp(logq) [B, K] with the uniforms u [B, N] (inverse CDF)."""
    cdf = jnp.cumsum(jnp.exp(logq), -1)
    x = jnp.minimum(u.astype(jnp.float32), _U_MAX) * cdf[:, -1:]
    return jnp.minimum((cdf[:, None, :] <= x[:, :, None]).sum(-1), logq.shape[-1] - 1)


def top_sorted(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest values [B, k] of each row, largest first, equal values by lower id first
    (lax.top_k's rule), and their ids."""
    x = jnp.where(x == 0, 0.0, x).astype(x.dtype)  # top_k orders -0.0 below 0.0; they are equal (XLA folds x + 0.0)
    return jax.lax.top_k(x, min(k, x.shape[-1]))


def sample_tokens(logits: jax.Array, u: jax.Array, k: int, temperature, top_p, min_p) -> jax.Array:
    """Plain sampling; k > 0 ranks only the k most likely (static), else the whole vocabulary."""
    vals, idx = top_sorted(logits, k if k > 0 else logits.shape[-1])
    logq = filter_sorted(vals, temperature, 0, top_p, min_p)
    return jnp.take_along_axis(idx, draw_sorted(logq, u[:, :1]), 1)[:, 0]


def ranked_tokens(logits: jax.Array, ranks: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """CoT: rank r >= 0 takes the r-th most likely token (state 0), rank -1 the argmax (state 1)."""
    top = top_sorted(logits, max(k, 1))[1]
    pick = jnp.take_along_axis(top, jnp.maximum(ranks, 0)[:, None], 1)[:, 0]
    return pick, (ranks < 0).astype(jnp.int32)


def entropix_plan(table: dict, H, V, attn, pause_ok=None):
    """Per-row regime codes and (temperature, top_k, top_p, min_p) from the regime table.

    table: arrays W [7, 20], lo, hi, is_int, off [20], code_to_col [6] and the thresholds
    (low_ent, low_vent, med_ent, med_vent, high_ent, high_vent) as scalars, so profiles that
    differ only in numbers share one compilation.
    """
    t = table
    feats = jnp.concatenate([jnp.ones_like(H)[:, None], H[:, None], V[:, None], attn.astype(jnp.float32)], 1)
    flowing = (H < t["low_ent"]) & (V < t["low_vent"])
    treading = (H >= t["high_ent"]) & (V < t["med_vent"])
    fork = V >= t["high_vent"]
    code = jnp.where(fork, BRANCH + (H >= t["med_ent"]).astype(jnp.int32), ADAPTIVE)
    tread = TREADING if pause_ok is None else TREADING + pause_ok.astype(jnp.int32)
    code = jnp.where(flowing, FLOWING, jnp.where(treading, tread, code))
    raw = jnp.dot(feats, t["W"], precision=jax.lax.Precision.HIGHEST)  # [B, 20]
    raw = jnp.clip(jnp.where(t["is_int"], jnp.floor(raw + t["off"]), raw), t["lo"], t["hi"])
    cols = len(EntropixTable.COLUMNS)
    params = raw.reshape(-1, 4, cols)[jnp.arange(raw.shape[0]), :, t["code_to_col"][code]]  # [B, 4]
    return code, params[:, 0], params[:, 1].astype(jnp.int32), params[:, 2], params[:, 3]


def entropix_score(logq, model_logp, entropy, weight) -> jax.Array:
    """Best-of-N score of candidates [B, N]: log q minus weight * |surprisal (bits) - entropy|."""
    return logq - weight * jnp.abs(-model_logp / LN2 - entropy[:, None])


def entropix_tokens(table: dict, vals, idx, H, V, attn, u, prev=None, ok=None):
    """The entropix sampler: (tokens [B], codes [B]) from the max_top_k most likely tokens'
    log-probabilities vals and ids idx [B, K] (most likely first). prev / ok [B] bool
    (previous token is the pause token / a pause may be inserted) are None when no row has
    one (static: the pause ops are left out)."""
    pid = table["pause_id"]
    code, temp, top_k, top_p, min_p = entropix_plan(table, H, V, attn, ok)
    logp = vals
    if prev is not None:  # never the pause token twice in a row: it goes behind every other candidate
        hit = prev[:, None] & (idx == pid)
        order = jnp.argsort(hit.astype(jnp.int32), axis=-1, stable=True)
        vals, idx, logp = (jnp.take_along_axis(a, order, 1) for a in (jnp.where(hit, NEG_INF, vals), idx, logp))
    logq = filter_sorted(vals, temp, top_k, top_p, min_p)
    cand = draw_sorted(logq, u)  # [B, N]
    pick = cand[:, 0]
    if cand.shape[1] > 1:
        score = entropix_score(jnp.take_along_axis(logq, cand, 1), jnp.take_along_axis(logp, cand, 1), H,
                               table["typicality_weight"])
        best = jnp.take_along_axis(cand, jnp.argmax(score, -1)[:, None], 1)[:, 0]
        pick = jnp.where(code == ADAPTIVE, best, pick)
    tokens = jnp.take_along_axis(idx, pick[:, None], 1)[:, 0]
    if ok is not None:
        tokens = jnp.where(code == PAUSE, pid, tokens)
    return tokens, code


def uniforms_from_keys(keys: jax.Array, n: int) -> jax.Array:
    """[B, n] uniforms from one `jax.random` key per row (a device-side random stream for a
    decode loop that never returns to the host; the engine passes its own host draws instead,
    which is what makes the tokens match the other backends)."""
    return jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(keys)

"""The jitted functions of one model, built once and shared by every backend over it.

Static arguments are shapes and choices only (cache capacity, captured layers, the sampler
kinds of a step, top_k); numbers that change per request (temperatures, thresholds, the
entropix table) are array arguments, so a new sampler_config does not recompile. Outputs
carry explicit shardings: the cache stays split as `sharding.cache_sharding` says from one
step to the next, the logits come back whole per row (gathered over "tp").

`compilations()` counts XLA compilations in this process (every jit and eager op), through
JAX's monitoring events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import monitoring

from ..base import step_blocks
from . import model as M
from . import ops
from .loader import JaxModel  # noqa: F401 (the type functions() takes)
from .sharding import cache_sharding, replicated, row_bucket, rows_sharding

__all__ = ["functions", "compilations", "row_bucket", "ops"]

_COMPILES = [0]
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _on_duration(event: str, duration: float, **kw: Any) -> None:
    if event == _COMPILE_EVENT:
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_on_duration)


def compilations() -> int:
    """XLA compilations so far in this process."""
    return _COMPILES[0]


@dataclass
class Functions:
    prefill: Callable
    decode: Callable
    take: Callable
    merge: Callable
    grow: Callable
    sample: Callable
    rows: Any  # NamedSharding of per-row inputs
    replicated: Any


_FUNCTIONS: dict[tuple, Functions] = {}


def functions(model: JaxModel) -> Functions:
    """The jitted functions for a model's config and mesh: models that share both (a
    reload, the same weights in another file) share the compilations too."""
    key = (model.config, model.mesh)
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = _build(model.config, model.mesh)
    return _FUNCTIONS[key]


def _build(cfg, mesh) -> Functions:
    rows, rep = rows_sharding(mesh), replicated(mesh)
    cache_sh = cache_sharding(mesh, cfg.num_key_value_heads)
    state_sh = (cache_sh, rows, rows)  # (cache, logits, attn): a pytree prefix

    def prefill(params, inv, tokens, starts, capacity, capture):
        logits, stats, cache = M.prefill(params, inv, tokens, starts, cfg=cfg, capacity=capacity, capture=capture)
        return cache, logits, ops.attention_metrics(stats, tokens.shape[0])

    def decode(params, inv, cache, tokens, starts, lengths, capture):
        logits, stats, cache = M.decode(params, inv, cache, tokens, starts, lengths, cfg=cfg, capture=capture)
        return cache, logits, ops.attention_metrics(stats, tokens.shape[0])

    def take(state, idx):
        return jax.tree.map(lambda a: a[idx], state)

    def merge(a, b, idx):
        return jax.tree.map(lambda x, y: jnp.concatenate([x, y])[idx], a, b)

    def grow(state, capacity):
        cache, logits, attn = state
        pad = [(0, 0), (0, capacity - cache[0][0].shape[1]), (0, 0), (0, 0)]
        return jax.tree.map(lambda a: jnp.pad(a, pad), cache), logits, attn

    return Functions(
        prefill=jax.jit(prefill, static_argnames=("capacity", "capture"), out_shardings=state_sh),
        decode=jax.jit(decode, static_argnames=("capture",), out_shardings=state_sh, donate_argnums=(2,)),
        take=jax.jit(take, out_shardings=state_sh),
        merge=jax.jit(merge, out_shardings=state_sh),
        grow=jax.jit(grow, static_argnames=("capacity",), out_shardings=state_sh),
        sample=jax.jit(sample_step, static_argnames=("kinds", "top_k"), out_shardings=rep),
        rows=rows, replicated=rep)


def _greedy(kind, a, logits, H, V, attn, top_lp, top_id):
    return top_id[:, 0], jnp.zeros(logits.shape[0], jnp.int32)


def _sample(kind, a, logits, H, V, attn, top_lp, top_id):
    return (ops.sample_tokens(logits, a["u"], kind[1], a["temperature"], a["top_p"], a["min_p"]),
            jnp.zeros(logits.shape[0], jnp.int32))


def _ranked(kind, a, logits, H, V, attn, top_lp, top_id):
    return ops.ranked_tokens(logits, a["ranks"], kind[1])


def _entropix(kind, a, logits, H, V, attn, top_lp, top_id):
    _, K, _, has_prev, has_ok = kind
    prev = a["flags"][:, 0] if has_prev else None
    ok = a["flags"][:, 1] if has_ok else None
    return ops.entropix_tokens(a["table"], top_lp[:, :K], top_id[:, :K], H, V, attn, a["u"], prev, ok)


# A group's static kind (its name first, as the backend's host side made it) -> one group's
# (tokens, codes) over every row of the padded batch.
KINDS = {"greedy": _greedy, "sample": _sample, "ranked": _ranked, "entropix": _entropix}


def sample_step(logits, attn, args, kinds: tuple, top_k: int):
    """Metrics, every group's policy and the top_k alternatives, as one step matrix
    (`backends.base.STEP_COLUMNS`; the attention-valid flag is the host's to fill)."""
    logp, H, V = ops.logit_metrics(logits)
    wide = max([top_k, 2] + [k[1] for k in kinds if k[0] == "entropix"])
    top_id = ops.top_sorted(logits, wide)[1]  # ranked by the logits: lax.top_k puts lower ids first in ties
    top_lp = jnp.take_along_axis(logp, top_id, 1)
    margin = jnp.exp(top_lp[:, 0]) - jnp.exp(top_lp[:, 1])
    tokens = jnp.zeros(logits.shape[0], jnp.int32)
    codes = jnp.zeros(logits.shape[0], jnp.int32)
    for kind, a in zip(kinds, args):
        tok, code = KINDS[kind[0]](kind, a, logits, H, V, attn, top_lp, top_id)
        tokens = jnp.where(a["mask"], tok.astype(jnp.int32), tokens)
        codes = jnp.where(a["mask"], code.astype(jnp.int32), codes)
    chosen = jnp.take_along_axis(logp, tokens[:, None], 1)[:, 0]
    blocks = step_blocks(tokens, codes, chosen, H, V, margin, attn, jnp.zeros_like(H), top_id[:, :top_k],
                         top_lp[:, :top_k])
    return jnp.concatenate([c.astype(jnp.float32) for c in blocks], 1)

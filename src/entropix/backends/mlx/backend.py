"""The MLX backend: an mlx-lm model, its ragged cache and the pending logits of every row."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ...sampler.policy import Entropix, Greedy, Ranked, Sample
from ..base import (SampleGroup, StepHost, TableCache, candidates, pause_flags, policy_op, ranking_width,
                    step_blocks)
from . import ops
from .cache import RowCache
from .model import forward


class MLXBackend:
    name = "mlx"

    def __init__(self, model, config, capture_layers: tuple[int, ...] = (-1,)) -> None:
        self.model, self.config = model, config
        self.vocab_size = config.vocab_size
        self.capture_layers = tuple(capture_layers)
        self.cache: RowCache | None = None
        self.logits: mx.array | None = None  # [B, V] pending next-token logits
        self.attn: mx.array | None = None  # [B, 4] attention metrics of the pending step
        self.attn_valid: mx.array | None = None  # [B] bool
        self._tables = TableCache(ops.entropix_table_arrays)

    @property
    def rows(self) -> int:
        return 0 if self.logits is None else self.logits.shape[0]

    # -- rows -------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        n, P = len(prompts), max(len(p) for p in prompts)
        toks = np.zeros((n, P), dtype=np.int32)
        for b, p in enumerate(prompts):  # left-padded: every prompt ends in the last column
            toks[b, P - len(p):] = p
        cache = RowCache(len(self.model.model.layers), n, [P - len(p) for p in prompts])
        logits, stats = forward(self.model, mx.array(toks), cache, self._layers(capture))
        attn = ops.attention_metrics(list(stats.values()), n)
        valid = mx.full((n,), bool(stats))
        if any(c != 1 for c in copies):  # a request's rows share its prefill
            picks = [b for b, c in enumerate(copies) for _ in range(c)]
            cache.select(picks)
            idx = mx.array(picks, dtype=mx.int32)
            logits, attn, valid = logits[idx], attn[idx], valid[idx]
        mx.eval(logits, attn, *[k for k in cache.keys], *[v for v in cache.values])
        if self.cache is None:
            self.cache, self.logits, self.attn, self.attn_valid = cache, logits, attn, valid
            return
        self.cache.join(cache)
        self.logits = mx.concatenate([self.logits, logits])
        self.attn = mx.concatenate([self.attn, attn])
        self.attn_valid = mx.concatenate([self.attn_valid, valid])

    def select(self, rows: Sequence[int]) -> None:
        if not rows:
            self.cache = self.logits = self.attn = self.attn_valid = None
            return
        self.cache.select(list(rows))
        idx = mx.array(list(rows), dtype=mx.int32)
        self.logits, self.attn, self.attn_valid = self.logits[idx], self.attn[idx], self.attn_valid[idx]

    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        t = mx.array(np.asarray(tokens, dtype=np.int32))[:, None]
        self.logits, stats = forward(self.model, t, self.cache, self._layers(capture))
        B = len(tokens)
        self.attn = ops.attention_metrics(list(stats.values()), B)
        self.attn_valid = mx.full((B,), bool(stats))
        # Build the step's graph now, compute it lazily: sample() evaluates it with the sampler ops.
        mx.async_eval(self.logits, self.attn, *self.cache.keys, *self.cache.values)

    def _layers(self, capture: bool) -> tuple[int, ...]:
        return self.capture_layers if capture else ()

    # -- sampling -----------------------------------------------------------------------
    def sample(self, groups: Sequence[SampleGroup], top_k: int) -> StepHost:
        logits = self.logits
        B = logits.shape[0]
        logp, H, V = ops.logit_metrics(logits)
        # one ranking serves the alternatives, the margin and every group's candidates
        top_id = ops.top_sorted(logits, ranking_width(groups, top_k, self.vocab_size))[1]
        top_lp = mx.take_along_axis(logp, top_id, axis=1)
        margin = mx.exp(top_lp[:, 0]) - mx.exp(top_lp[:, 1])
        tokens, codes = mx.zeros((B,), dtype=mx.int32), mx.zeros((B,), dtype=mx.int32)
        for g in groups:
            whole = list(g.rows) == list(range(B))
            idx = None if whole else mx.array(list(g.rows), dtype=mx.int32)

            def part(x: mx.array) -> mx.array:
                return x if idx is None else x[idx]

            op = policy_op(self._OPS, g.policy, self.name)
            tok, code = op(self, g, part(logits), part(H), part(V), part(self.attn), part(top_lp), part(top_id))
            if idx is None:
                tokens, codes = tok.astype(mx.int32), code.astype(mx.int32)
            else:
                tokens[idx], codes[idx] = tok.astype(mx.int32), code.astype(mx.int32)
        chosen = mx.take_along_axis(logp, tokens[:, None], axis=1)[:, 0]
        blocks = step_blocks(tokens, codes, chosen, H, V, margin, self.attn, self.attn_valid, top_id[:, :top_k],
                             top_lp[:, :top_k])
        # the step's one device -> host transfer, in fp32 (ids below 2^24 are exact)
        m = mx.concatenate([c.astype(mx.float32) for c in blocks], 1)
        return StepHost.from_matrix(np.array(m).astype(np.float64), top_k)

    # The policies' ops (_OPS): (tokens, codes) for one group's rows.
    def _greedy(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return top_id[:, 0], mx.zeros((logits.shape[0],), dtype=mx.int32)  # the argmax is the first of the ranking

    def _sample(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return ops.sample_tokens(g.policy, logits, _dev(g.uniforms)), mx.zeros((logits.shape[0],), dtype=mx.int32)

    def _ranked(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return ops.ranked_tokens(logits, _dev(g.ranks), int(np.max(g.ranks)) + 1)

    def _entropix(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        p = g.policy
        prev, ok = (None if f is None else _dev(f) for f in pause_flags(g))
        K = candidates(p, self.vocab_size)
        return ops.entropix_tokens(self._tables(p), p, top_lp[:, :K], top_id[:, :K], H, V, attn, _dev(g.uniforms),
                                   prev, ok)

    _OPS = {Greedy: _greedy, Sample: _sample, Ranked: _ranked, Entropix: _entropix}


def _dev(a: np.ndarray) -> mx.array:
    if a.dtype == np.float64:  # uniforms: fp32 is what the draws compare against anyway
        a = a.astype(np.float32)
    elif a.dtype == np.int64:
        a = a.astype(np.int32)
    return mx.array(np.ascontiguousarray(a))

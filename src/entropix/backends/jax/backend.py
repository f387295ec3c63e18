"""The JAX backend: the host engine's four calls over jitted, statically shaped functions.

The batch is padded to a bucket (`sharding.row_bucket`: a multiple of dp, dp times a power
of two) and the cache to a multiple of 256 slots, so a decode step compiles once per
(bucket, capacity) and not once per token. Padding rows hold copies of a real row, have
start = length = 0 and are never shown to the host. Per-row starts and lengths live on
the host (lists) and travel with every call as small arrays, so no step reads the device
except sample()'s one transfer.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ...sampler.policy import Entropix, Greedy, Ranked, Sample
from ..base import ATTN_VALID, SampleGroup, StepHost, TableCache, candidates, entropix_arrays, policy_op
from . import compiled as C
from .loader import JaxModel

CAPACITY_STEP = 256


def _round(n: int, step: int) -> int:
    return -(-n // step) * step


def prompt_bucket(n: int) -> int:
    """Padded prompt length: 16, 32, 64, ... so prompts of similar length share a compilation."""
    return max(16, 1 << (n - 1).bit_length())


class JaxBackend:
    name = "jax"

    def __init__(self, model: JaxModel, capture_layers: tuple[int, ...] = (-1,)) -> None:
        self.model = model
        self.fns = C.functions(model)
        self.vocab_size = model.config.vocab_size
        L = model.config.num_hidden_layers
        self.capture_layers = tuple(sorted({i % L for i in capture_layers}))
        self.dp = model.mesh.shape["dp"]
        self.state = None  # (cache, logits [Bp, V], attn [Bp, 4]) on the mesh, Bp = padded rows
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.attn_valid = np.zeros(0, bool)
        self._tables = TableCache(lambda p: jax.device_put(entropix_arrays(p), self.fns.replicated))

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def padded(self) -> int:
        return 0 if self.state is None else self.state[1].shape[0]

    def _index(self, rows: Sequence[int], n_out: int) -> jax.Array:
        """Gather indices padded to the bucket of n_out rows (padding repeats row 0)."""
        idx = np.zeros(C.row_bucket(n_out, self.dp), np.int32)
        idx[:len(rows)] = rows
        return jax.device_put(idx, self.fns.replicated)

    # -- rows -------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        P = max(len(p) for p in prompts)
        T, B = prompt_bucket(P), C.row_bucket(len(prompts), self.dp)
        toks = np.zeros((B, T), np.int32)
        starts = np.full(B, T - 1, np.int32)
        for b, p in enumerate(prompts):  # left-padded: every prompt ends in the last column
            toks[b, T - len(p):] = p
            starts[b] = T - len(p)
        cap = max(_round(T + 1, CAPACITY_STEP), self._capacity())
        layers = self.capture_layers if capture else ()
        new = self.fns.prefill(self.model.params, self.model.inv_freq, jax.device_put(toks, self.fns.rows),
                               jax.device_put(starts, self.fns.rows), capacity=cap, capture=layers)
        picks = [b for b, c in enumerate(copies) for _ in range(c)]
        valid = np.full(len(picks), bool(layers))
        if self.state is None:
            self.state = self.fns.take(new, self._index(picks, len(picks)))
            self.starts, self.lengths, self.attn_valid = [int(starts[b]) for b in picks], [T] * len(picks), valid
            return
        old = self.state if self._capacity() == cap else self.fns.grow(self.state, capacity=cap)
        total = self.rows + len(picks)
        idx = list(range(self.rows)) + [self.padded + b for b in picks]
        self.state = self.fns.merge(old, new, self._index(idx, total))
        self.starts += [int(starts[b]) for b in picks]
        self.lengths += [T] * len(picks)
        self.attn_valid = np.concatenate([self.attn_valid, valid])

    def select(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        if not rows:
            self.state, self.starts, self.lengths, self.attn_valid = None, [], [], np.zeros(0, bool)
            return
        if rows != list(range(self.rows)) or C.row_bucket(len(rows), self.dp) != self.padded:
            self.state = self.fns.take(self.state, self._index(rows, len(rows)))
        self.starts = [self.starts[r] for r in rows]
        self.lengths = [self.lengths[r] for r in rows]
        self.attn_valid = self.attn_valid[rows]

    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        need = max(self.lengths) + 1
        if need > self._capacity():
            cap = _round(max(need, 2 * self._capacity()), CAPACITY_STEP)
            self.state = self.fns.grow(self.state, capacity=cap)
        layers = self.capture_layers if capture else ()
        cache = self.state[0]
        self.state = None  # the cache is donated to the step: drop our reference first
        B = cache[0][0].shape[0]
        self.state = self.fns.decode(self.model.params, self.model.inv_freq, cache, self._padded_rows(tokens, B),
                                     self._padded_rows(self.starts, B), self._padded_rows(self.lengths, B),
                                     capture=layers)
        self.lengths = [n + 1 for n in self.lengths]
        self.attn_valid = np.full(len(tokens), bool(layers))

    def _padded_rows(self, values: Sequence[int], B: int) -> jax.Array:
        """A per-row int array padded with zeros to B rows, split over "dp"."""
        a = np.zeros(B, np.int32)
        a[:len(values)] = values
        return jax.device_put(a, self.fns.rows)

    def _capacity(self) -> int:
        return 0 if self.state is None else self.state[0][0][0].shape[1]

    def synchronize(self) -> None:
        """Wait for the queued device work (benchmarks time it)."""
        if self.state is not None:
            jax.block_until_ready(self.state)

    # -- sampling -----------------------------------------------------------------------
    def sample(self, groups: Sequence[SampleGroup], top_k: int) -> StepHost:
        _, logits, attn = self.state
        kinds, args = zip(*(self._group(g) for g in groups)) if groups else ((), ())
        m = self.fns.sample(logits, attn, tuple(args), kinds=tuple(kinds), top_k=top_k)
        m = np.asarray(m)[:self.rows].astype(np.float64)  # the step's one device -> host transfer
        m[:, ATTN_VALID] = self.attn_valid
        return StepHost.from_matrix(m, top_k)

    def _group(self, g: SampleGroup) -> tuple[tuple, dict]:
        """A group's static kind (part of the compilation key; its name picks the op in
        `compiled.KINDS`) and its per-row arrays over the padded batch."""
        mask = np.zeros(self.padded, bool)
        mask[list(g.rows)] = True
        kind, args = policy_op(self._OPS, g.policy, self.name)(self, g, list(g.rows))
        return kind, {"mask": mask, **args}

    def _greedy(self, g: SampleGroup, rows: list[int]) -> tuple[tuple, dict]:
        return ("greedy",), {}

    def _sample(self, g: SampleGroup, rows: list[int]) -> tuple[tuple, dict]:
        q = g.policy.params
        return ("sample", int(q.top_k)), {"u": self._spread(g.uniforms[:, :1], rows, 1),
                                          "temperature": np.float32(q.temperature),
                                          "top_p": np.float32(q.top_p), "min_p": np.float32(q.min_p)}

    def _ranked(self, g: SampleGroup, rows: list[int]) -> tuple[tuple, dict]:
        ranks = np.full(self.padded, -1, np.int32)
        ranks[rows] = g.ranks
        k = 1 << int(np.max(g.ranks) + 1).bit_length()  # a power of two above every rank
        return ("ranked", min(k, self.vocab_size)), {"ranks": ranks}

    def _entropix(self, g: SampleGroup, rows: list[int]) -> tuple[tuple, dict]:
        p = g.policy
        flags = np.zeros((self.padded, 2), bool)
        flags[rows] = g.flags
        # Both pause ops always run (all-false flags leave the tokens as they are): a step program
        # per combination of flags would cost a compile (seconds) each, the ops microseconds.
        kind = ("entropix", candidates(p, self.vocab_size), p.draws, True, True)
        return kind, {"u": self._spread(g.uniforms, rows, p.draws), "flags": flags, "table": self._tables(p)}

    # The policies' host sides (static kind, per-row arrays); `compiled.KINDS` has their device ops.
    _OPS = {Greedy: _greedy, Sample: _sample, Ranked: _ranked, Entropix: _entropix}

    def _spread(self, u: np.ndarray, rows: list[int], n: int) -> np.ndarray:
        out = np.zeros((self.padded, n), np.float32)
        out[rows] = u.astype(np.float32)
        return out


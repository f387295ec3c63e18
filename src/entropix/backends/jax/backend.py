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
from ..base import SampleGroup, StepHost
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
        self._tables: dict[object, dict] = {}

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
        n, P = len(prompts), max(len(p) for p in prompts)
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
        m[:, 10] = self.attn_valid
        return StepHost.from_matrix(m, top_k)

    def _group(self, g: SampleGroup) -> tuple[tuple, dict]:
        """A group's static kind (part of the compilation key) and its per-row arrays."""
        p, Bp, rows = g.policy, self.padded, list(g.rows)
        mask = np.zeros(Bp, bool)
        mask[rows] = True
        if isinstance(p, Greedy):
            return ("greedy",), {"mask": mask}
        if isinstance(p, Sample):
            q = p.params
            return ("sample", int(q.top_k)), {"mask": mask, "u": self._spread(g.uniforms[:, :1], rows, 1),
                                              "temperature": np.float32(q.temperature),
                                              "top_p": np.float32(q.top_p), "min_p": np.float32(q.min_p)}
        if isinstance(p, Ranked):
            ranks = np.full(Bp, -1, np.int32)
            ranks[rows] = g.ranks
            k = 1 << int(np.max(g.ranks) + 1).bit_length()  # a power of two above every rank
            return ("ranked", min(k, self.vocab_size)), {"mask": mask, "ranks": ranks}
        if isinstance(p, Entropix):
            table = p.table()
            if table not in self._tables:
                if len(self._tables) >= 64:  # a server sees many sampler_configs: keep the newest
                    self._tables.pop(next(iter(self._tables)))
                self._tables[table] = jax.device_put(C.ops.entropix_table_arrays(p), self.fns.replicated)
            flags = np.zeros((Bp, 2), bool)
            flags[rows] = g.flags
            K = min(p.config.max_top_k, self.vocab_size)
            kind = ("entropix", K, p.draws, bool(flags[:, 0].any()), bool(flags[:, 1].any()))
            return kind, {"mask": mask, "u": self._spread(g.uniforms, rows, p.draws), "flags": flags,
                          "table": self._tables[table]}
        raise TypeError(f"the jax backend has no ops for policy {type(p).__name__}")

    def _spread(self, u: np.ndarray, rows: list[int], n: int) -> np.ndarray:
        out = np.zeros((self.padded, n), np.float32)
        out[rows] = u.astype(np.float32)
        return out


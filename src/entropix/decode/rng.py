"""Explicit per-row random state: a 64-bit seed and a draw counter.

Draw k of a row is a pure function of (seed, k): splitmix64 of seed + (k + 1) * golden
gamma, as 53-bit uniforms in [0, 1). The host computes every draw, so a row's text
depends only on its seed (alone or in any batch), forks get seeds of their own, and
every backend receives the same numbers: their sampler decisions can be compared draw
for draw.
"""

from __future__ import annotations

import secrets

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def row_seed(seed: int | None, choice: int) -> int:
    """A distinct, reproducible seed per row of a request (random when seed is None)."""
    if seed is None:
        return secrets.randbits(64)
    z = (int(seed) * 1_000_003 + choice * 7_919 + 1) & _MASK
    return int(_mix(np.array([z], dtype=np.uint64))[0])


def _mix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seeds: np.ndarray, counters: np.ndarray, n: int) -> np.ndarray:
    """[B, n] float64 uniforms: draws counters[b] .. counters[b] + n - 1 of row b's stream."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    k = np.asarray(counters, dtype=np.uint64)[:, None] + np.arange(n, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = seeds[:, None] + (k + np.uint64(1)) * _GOLDEN
    return (_mix(z) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def take_draws(rows, n: int) -> np.ndarray | None:
    """This step's n draws of each row (objects with .seed and .draws, whose counters move on),
    [len(rows), n]; None when the policy draws nothing."""
    if not n:
        return None
    u = uniforms(np.array([r.seed for r in rows], dtype=np.uint64), np.array([r.draws for r in rows], dtype=np.uint64), n)
    for r in rows:
        r.draws += n
    return u

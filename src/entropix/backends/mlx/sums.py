"""Accurate sums over long rows.

MLX's CPU reduction adds a row's elements one after another in fp32: over a 49152-token
vocabulary the probabilities of a uniform distribution sum to 0.99961, which moves the
entropy by 6e-3 bits and the varentropy by 0.09. Summing blocks of 256 first, then the
block sums, and so on (blocks of 32), keeps the error to a few dozen ulps, as PyTorch's
pairwise sums do.
"""

from __future__ import annotations

import mlx.core as mx

BLOCK = 32


def rowsum(x: mx.array) -> mx.array:
    """Sum over the last axis, block by block."""
    n = x.shape[-1]
    if n <= BLOCK:
        return x.sum(-1)
    pad = (-n) % BLOCK
    if pad:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return rowsum(x.reshape(*x.shape[:-1], -1, BLOCK).sum(-1))

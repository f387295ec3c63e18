"""Small statistics for accuracy comparisons (pure Python, exact where it matters)."""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

__all__ = ["wilson_interval", "mcnemar_exact", "paired_counts", "holm"]


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The bounds touch 0 and 1 exactly at k == 0 and k == n; avoid rounding dust there.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = term = 1  # C(n, 0); each next term from the last, so the tail costs k steps, not k binomials
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)  # exact: C(n, i) * (n - i) is divisible by i + 1
        tail += term
    # Integer arithmetic keeps this exact for any n; int / int rounds once at the end.
    return min(1.0, 2 * tail / 2**n)


def paired_counts(a: Mapping[Hashable, bool], b: Mapping[Hashable, bool]) -> tuple[int, int, int, int]:
    """(both right, only a right, only b right, neither) over the ids present in both."""
    both = only_a = only_b = neither = 0
    for key in a.keys() & b.keys():
        ra, rb = bool(a[key]), bool(b[key])
        if ra and rb:
            both += 1
        elif ra:
            only_a += 1
        elif rb:
            only_b += 1
        else:
            neither += 1
    return both, only_a, only_b, neither


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order: reject where adjusted p < alpha and the
    family-wise error rate stays at most alpha for any dependence between the tests."""
    if any(not 0.0 <= p <= 1.0 for p in pvalues):
        raise ValueError(f"p-values must lie in [0, 1], got {list(pvalues)}")
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        # The k-th smallest p is scaled by the m - k tests still standing; the running maximum
        # keeps the adjusted values in the order of the raw ones (step-down).
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out

"""The host's random draws that every backend's sampler ops consume.

The ops themselves (metrics with known answers, filters and draws against their target
distributions, the entropix decisions) are held to the float64 reference for every backend in
tests/test_conformance.py.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chisquare

from entropix.decode.rng import uniforms


def test_host_uniforms_are_uniform_and_per_row():
    u = uniforms(np.array([7], dtype=np.uint64), np.array([0]), 50000)[0]
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    assert chisquare(counts).pvalue > 1e-3 and 0 <= u.min() and u.max() < 1
    # draw k of a row depends on (seed, k) only
    both = uniforms(np.array([7, 9], dtype=np.uint64), np.array([3, 0]), 4)
    assert np.array_equal(both[0], uniforms(np.array([7], dtype=np.uint64), np.array([3]), 4)[0])
    assert not np.array_equal(both[0], both[1])

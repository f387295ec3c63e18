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


def test_torch_cpu_ranking_mends_ties_as_the_device_route_orders_them():
    """On the CPU, top_sorted mends the rows a tie crosses at the k-th place; on many-tied rows it
    picks and orders exactly as the exact (value, lower id) keys every other device uses."""
    import torch

    from entropix.backends.torch import ops

    g = torch.Generator().manual_seed(0)
    tied_rows = 0
    for _ in range(200):
        V = int(torch.randint(5, 300, (1,), generator=g))
        k = min(int(torch.randint(1, 20, (1,), generator=g)), V - 1)
        x = torch.randint(0, 6, (3, V), generator=g).float()
        vals, ids = ops.top_sorted(x, k)
        want = ops._order_key(x).topk(k, dim=-1).indices
        assert torch.equal(ids, want) and torch.equal(vals, x.gather(1, want))
        tied_rows += int((x.topk(k + 1).values[:, k - 1] == x.topk(k + 1).values[:, k]).sum())
    assert tied_rows > 100  # the mending path ran

"""The MLX sampler ops' eager path (the backend runs the compiled one, which
tests/test_conformance.py holds to the float64 reference with every other backend's ops)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from entropix.backends.mlx import ops


@pytest.mark.parametrize("n", [2, 64, 49152])
@pytest.mark.parametrize("compiled", [True, False])
def test_uniform_over_n_has_entropy_log2_n(n, compiled):
    _, H, V = ops.logit_metrics(mx.zeros((1, n)), compiled=compiled)
    assert H.item() == pytest.approx(math.log2(n), abs=1e-4) and V.item() == pytest.approx(0.0, abs=1e-4)


def test_eager_metrics_are_the_compiled_ones():
    x = np.random.default_rng(0).normal(0, 3, (6, 5000)).astype(np.float32)
    x[1, 100:] = -np.inf  # a row with impossible tokens
    for a, b in zip(ops.logit_metrics(mx.array(x), compiled=False), ops.logit_metrics(mx.array(x), compiled=True)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-6)

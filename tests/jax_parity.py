"""A JAX backend against a PyTorch one that holds the same rows (tests/test_jax_*.py)."""

from __future__ import annotations

import numpy as np


def assert_close(jb, tb, tol: float = 1e-4) -> None:
    """The real rows' fp32 logits and attention statistics within tol of torch's."""
    lj = np.asarray(jb.state[1])[:jb.rows]
    assert lj.shape == tuple(tb.logits.shape)
    np.testing.assert_allclose(lj, tb.logits.numpy(), atol=tol, rtol=0)
    np.testing.assert_allclose(np.asarray(jb.state[2])[:jb.rows], tb.attn.numpy(), atol=tol, rtol=0)

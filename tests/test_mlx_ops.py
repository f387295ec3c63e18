"""The MLX sampler ops: known answers, target distributions (chi-square), and the same
numbers and decisions as the PyTorch twin on the same inputs."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from entropix.backends.mlx import ops
from entropix.backends.torch import ops as tops
from entropix.decode.rng import uniforms
from entropix.sampler.config import SamplerConfig
from entropix.sampler.policy import ENTROPIX_STATES, Entropix

PROBS = np.array([0.35, 0.25, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02])
CFG = SamplerConfig(model="test", low_ent=1.0, low_vent=1.0, med_ent=3.0, high_ent=5.0, med_vent=4.0, high_vent=8.0)


@pytest.mark.parametrize("n", [2, 64, 49152])
@pytest.mark.parametrize("compiled", [True, False])
def test_uniform_over_n_has_entropy_log2_n(n, compiled):
    _, H, V = ops.logit_metrics(mx.zeros((1, n)), compiled=compiled)
    assert H.item() == pytest.approx(math.log2(n), abs=1e-4) and V.item() == pytest.approx(0.0, abs=1e-4)


def test_metrics_match_torch_on_random_logits():
    x = np.random.default_rng(0).normal(0, 3, (6, 5000)).astype(np.float32)
    x[1, 100:] = -np.inf  # a row with impossible tokens
    lp, H, V = ops.logit_metrics(mx.array(x))
    tlp, tH, tV = tops.logit_metrics(torch.from_numpy(x))
    np.testing.assert_allclose(np.array(H), tH.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(V), tV.numpy(), rtol=1e-4, atol=1e-4)
    live = np.isfinite(x)
    np.testing.assert_allclose(np.array(lp)[live], tlp.numpy()[live], atol=1e-5)


@pytest.mark.parametrize("params", [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2)])
def test_filter_and_draw_reproduce_the_target_distribution(params):
    T, k, p, m = params
    vals = mx.array(np.log(PROBS)[None, :].astype(np.float32))
    logq = ops.filter_sorted(vals, T, k, p, m)
    np.testing.assert_allclose(np.array(logq), tops.filter_sorted(torch.from_numpy(np.array(vals)), T, k, p, m).numpy(),
                               atol=1e-6)
    n = 20000
    u = uniforms(np.arange(n, dtype=np.uint64), np.zeros(n), 1)
    picks = np.array(ops.draw_sorted(mx.broadcast_to(logq, (n, len(PROBS))), mx.array(u.astype(np.float32))))[:, 0]
    q = np.exp(np.array(logq)[0].astype(np.float64))
    keep = q > 0
    counts = np.bincount(picks, minlength=len(PROBS))
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep], q[keep] / q[keep].sum() * n).pvalue > 1e-3


def test_draw_detects_a_wrong_distribution():
    n = 20000
    u = uniforms(np.arange(n, dtype=np.uint64), np.zeros(n), 1)
    logq = mx.array(np.log(PROBS)[None, :].astype(np.float32))
    picks = np.array(ops.draw_sorted(mx.broadcast_to(logq, (n, 8)), mx.array(u.astype(np.float32))))[:, 0]
    wrong = np.roll(PROBS, 1)
    assert chisquare(np.bincount(picks, minlength=8), wrong * n).pvalue < 1e-6


def test_entropix_decisions_match_torch_in_every_state():
    """Constructed metrics that reach every state; the same draws give the same tokens and codes."""
    rng = np.random.default_rng(2)
    B, K = 240, 40
    H = rng.uniform(0, 7, B).astype(np.float32)
    V = rng.uniform(0, 11, B).astype(np.float32)
    attn = rng.uniform(0, 1.5, (B, 4)).astype(np.float32)
    logits = rng.normal(0, 2, (B, 500)).astype(np.float32)
    policy = Entropix(CFG, pause_id=int(np.argmax(logits[0])))
    u = uniforms(np.arange(B, dtype=np.uint64), np.zeros(B), policy.draws).astype(np.float32)
    prev = rng.random(B) < 0.3
    ok = ~prev & (rng.random(B) < 0.7)
    tlp = torch.log_softmax(torch.from_numpy(logits), -1)
    tv, ti = tlp.topk(K, -1)
    want = tops.entropix_tokens(tops.entropix_table_tensors(policy, "cpu"), policy, tv, ti, torch.from_numpy(H),
                                torch.from_numpy(V), torch.from_numpy(attn), torch.from_numpy(u),
                                torch.from_numpy(prev), torch.from_numpy(ok))
    mv, mi = ops.top_sorted(mx.array(tlp.numpy()), K)
    got = ops.entropix_tokens(ops.entropix_table_arrays(policy), policy, mv, mi, mx.array(H), mx.array(V),
                              mx.array(attn), mx.array(u), mx.array(prev), mx.array(ok))
    assert (np.array(got[1]) == want[1].numpy()).all()
    assert (np.array(got[0]) == want[0].numpy()).all()
    assert set(np.array(got[1]).tolist()) == set(range(len(ENTROPIX_STATES)))

"""The numpy logits-only sampler maths (adapters/ops.py) as the hooks use it. Its tokens, codes
and metrics against the float64 reference, with every other backend's: tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest

from entropix.adapters import hooks, ops
from entropix.backends.base import SampleGroup
from entropix.sampler.config import SamplerConfig, SamplingParams
from entropix.sampler.policy import ENTROPIX_STATES, Entropix, Greedy, Sample

# thresholds in the range of these random logits, so that every state occurs
CFG = SamplerConfig(low_ent=0.5, low_vent=0.5, med_ent=4.0, high_ent=6.0, med_vent=3.0, high_vent=2.0)


def random_logits(B: int = 64, V: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-2.0, 2.5, size=(B, 1)))  # from near-uniform to peaked rows
    return (rng.standard_normal((B, V)) * scale).astype(np.float32)


def test_logits_only_table_ignores_attention():
    policy = Entropix(CFG, attention=False)
    H, V = np.array([1.0, 3.0, 7.0], np.float32), np.array([1.0, 4.0, 6.0], np.float32)
    a = ops.entropix_plan(policy, H, V, np.zeros((3, 4), np.float32))
    b = ops.entropix_plan(policy, H, V, np.full((3, 4), 3.0, np.float32))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with_attn = ops.entropix_plan(Entropix(CFG), H, V, np.full((3, 4), 3.0, np.float32))
    assert not np.array_equal(with_attn[1], b[1])  # the full sampler does read them
    assert Entropix(CFG).needs_attention and not policy.needs_attention


def test_sample_and_greedy_groups():
    x = random_logits(B=8)
    sp = SamplingParams(temperature=0.8, top_p=0.9)
    u = np.random.default_rng(3).random((4, 1))
    groups = [SampleGroup(Greedy(), (0, 2, 4, 6)), SampleGroup(Sample(sp), (1, 3, 5, 7), uniforms=u)]
    host = ops.sample(x, groups, k=3)
    np.testing.assert_array_equal(host.token[[0, 2, 4, 6]], x[[0, 2, 4, 6]].argmax(-1))
    np.testing.assert_array_equal(host.token[[1, 3, 5, 7]], ops.sample_tokens(Sample(sp), x[[1, 3, 5, 7]], u))
    assert host.top_ids.shape == (8, 3) and not host.attn_valid.any()
    np.testing.assert_allclose(host.margin, np.exp(host.top_logprobs[:, 0]) - np.exp(host.top_logprobs[:, 1]), atol=1e-6)


def test_logits_sampler_keeps_the_engine_row_stream():
    """A hook's draws are the engine's: row_seed(seed, 0), policy.draws per step."""
    policy = Entropix(CFG, attention=False)
    s = hooks.LogitsSampler(policy, seed=5)
    x = random_logits(B=3, seed=9)
    toks = [s(row) for row in x]
    assert s.row.draws == 3 * CFG.n_candidates and s.row.tokens == toks
    s.reset()
    assert [s(row) for row in x] == toks  # reproducible from the seed
    with pytest.raises(Exception, match="attention"):
        hooks.LogitsSampler(Entropix(CFG))


def test_catalogue_logits_only_entropix():
    from entropix.sampler import catalog

    assert catalog.variant("entropix", no_attention=True) == "entropix-logits"
    assert catalog.variant("entropix", branching=False, no_attention=False) == "entropix"
    dec = catalog.resolve("entropix-logits", None, sampler_config=CFG)
    assert isinstance(dec.policy, Entropix) and not dec.policy.attention and not dec.policy.needs_attention
    assert dec.strategy == "single" and dec.spec.regimes == ENTROPIX_STATES
    assert "entropix-logits" not in [d["name"] for d in catalog.describe()]  # not offered in the playground
    assert hooks.logits_only(catalog.resolve("entropix", None, sampler_config=CFG).policy) == dec.policy

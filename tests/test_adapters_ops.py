"""The numpy logits-only sampler maths (adapters/ops.py) against the torch ops it twins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entropix.adapters import hooks, ops
from entropix.backends.base import SampleGroup
from entropix.backends.torch import ops as tops
from entropix.sampler.config import SamplerConfig, SamplingParams
from entropix.sampler.policy import ENTROPIX_STATES, Entropix, Greedy, Sample, entropix_states

# thresholds in the range of these random logits, so that every state occurs
CFG = SamplerConfig(low_ent=0.5, low_vent=0.5, med_ent=4.0, high_ent=6.0, med_vent=3.0, high_vent=2.0)


def random_logits(B: int = 64, V: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-2.0, 2.5, size=(B, 1)))  # from near-uniform to peaked rows
    return (rng.standard_normal((B, V)) * scale).astype(np.float32)


def torch_choice(policy: Entropix, logits: np.ndarray, u: np.ndarray, prev=None, ok=None):
    lt = torch.from_numpy(logits)
    logp, H, V = tops.logit_metrics(lt)
    K = min(policy.config.max_top_k, logits.shape[1])
    vals, idx = logp.topk(K, dim=-1)
    table = tops.entropix_table_tensors(policy, "cpu")
    flags = [None if f is None else torch.from_numpy(f) for f in (prev, ok)]
    tok, code = tops.entropix_tokens(table, policy, vals, idx, H, V, torch.zeros(len(logits), 4),
                                     torch.from_numpy(u.astype(np.float32)), *flags)
    return tok.numpy(), code.numpy(), H.numpy(), V.numpy()


def test_metrics_match_torch():
    x = random_logits()
    logp, H, V = ops.logit_metrics(x)
    tl, tH, tV = tops.logit_metrics(torch.from_numpy(x))
    np.testing.assert_allclose(logp, tl.numpy(), atol=1e-5)
    np.testing.assert_allclose(H, tH.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(V, tV.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropix_tokens_match_torch_ops(seed):
    policy = Entropix(CFG, pause_id=7, attention=False)
    x = random_logits(seed=seed)
    B = len(x)
    u = np.random.default_rng(100 + seed).random((B, CFG.n_candidates))
    prev = np.arange(B) % 5 == 0
    ok = ~prev
    tok, code, H, V = torch_choice(policy, x, u, prev, ok)
    logp, nH, nV = ops.logit_metrics(x)
    vals, idx = ops.top_k(logp, CFG.max_top_k)
    ntok, ncode = ops.entropix_tokens(policy, vals, idx, nH, nV, u, prev, ok)
    assert set(ENTROPIX_STATES[c] for c in ncode) == set(ENTROPIX_STATES)  # every strategy was exercised
    np.testing.assert_array_equal(ncode, code)
    np.testing.assert_array_equal(ncode, entropix_states(CFG, H, V, ok))  # the host reference decides states
    # the same token everywhere but at float ties of the inverse CDF (none expected with these seeds)
    assert (ntok == tok).mean() == 1.0
    assert not np.any(prev & (ntok == 7))  # never the pause token twice in a row


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
    want = tops.sample_tokens(Sample(sp), torch.from_numpy(x[[1, 3, 5, 7]]), torch.from_numpy(u.astype(np.float32)))
    np.testing.assert_array_equal(host.token[[1, 3, 5, 7]], want.numpy())
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
    assert dec.strategy == "single" and dec.spec.states == ENTROPIX_STATES
    assert "entropix-logits" not in [d["name"] for d in catalog.describe()]  # not offered in the playground
    assert hooks.logits_only(catalog.resolve("entropix", None, sampler_config=CFG).policy) == dec.policy

"""The MLX backend against its PyTorch twin on a tiny random model: logits and attention
metrics over ragged batches with forks and joins, and the same decisions from the same draws."""

from __future__ import annotations

import numpy as np
import pytest

from entropix.backends import create_backend
from entropix.decode.records import Request
from entropix.decode.strategies import Task, decode, run
from entropix.sampler import catalog
from entropix.sampler.config import SamplerConfig
from entropix.sampler.policy import Entropix

from mlxtiny import mlx_twin
from tinymodel import tiny_lm

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    t = tiny_lm(seed=3)
    return t, mlx_twin(t)


def _same_pending(bt, bm):
    lt, lm_ = bt.logits.numpy(), np.array(bm.logits)
    assert lt.shape == lm_.shape
    np.testing.assert_allclose(lm_, lt, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.array(bm.attn), bt.attn.numpy(), atol=TOL, rtol=0)
    assert (np.array(bm.attn_valid) == bt.attn_valid.numpy()).all()


def test_ragged_batch_with_forks_and_joins_matches_torch(pair):
    t, m = pair
    bt, bm = create_backend(t), create_backend(m)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 256, n)) for n in (5, 12, 1)]
    for b in (bt, bm):
        b.prefill(prompts, [1, 2, 1], capture=True)
    _same_pending(bt, bm)
    steps = [("advance",), ("advance",), ("select", [3, 0, 0, 1]), ("advance",),
             ("prefill", [list(rng.integers(1, 256, 30)), [7, 8]]),  # longer than the batch, and shorter
             ("advance",), ("select", [5, 1, 4]), ("advance",), ("advance",)]
    for op in steps:
        if op[0] == "advance":
            toks = [int(x) for x in rng.integers(1, 256, bt.rows)]
            for b in (bt, bm):
                b.advance(toks, capture=True)
        elif op[0] == "select":
            for b in (bt, bm):
                b.select(op[1])
        else:
            for b in (bt, bm):
                b.prefill(op[1], [1] * len(op[1]), capture=True)
        _same_pending(bt, bm)
    assert bm.rows == 3


def test_no_capture_leaves_attention_invalid(pair):
    _, m = pair
    b = create_backend(m)
    b.prefill([[1, 2, 3]], [1], capture=False)
    assert not np.array(b.attn_valid).any()
    b.select([])
    assert b.rows == 0


def _records(lm, policy, seeds, prompts, n=12):
    eng = lm.engine()
    eng.add([Request(prompt=p, policy=policy, max_tokens=n, seed=s, stop_ids=frozenset(), top_logprobs=3)
             for p, s in zip(prompts, seeds)])
    out = []
    while eng.active:
        out.extend(eng.step())
    return [(r.index, r.token, r.state) for r in out], out


@pytest.mark.parametrize("name", ["entropix", "sample", "greedy"])
def test_same_draws_same_decisions_as_torch(pair, name):
    t, m = pair
    if name == "entropix":  # thresholds that reach every state on this model
        cfg = SamplerConfig(model="tiny", low_ent=6.97, low_vent=2.6, med_ent=7.0, high_ent=7.09, med_vent=2.6,
                            high_vent=2.85, pause_budget=3)
        policy = Entropix(cfg, pause_id=ord("."))
    else:
        policy = catalog.resolve(name, t, temperature=1.0, top_p=0.9).policy if name == "sample" else \
            catalog.resolve(name, t).policy
    prompts = [list(b"Hello there"), list(b"a"), list(b"The entropy of it all")]
    n = 64 if name == "greedy" else 12  # greedy: as many tokens as tests/test_mlx_embedded.py once decoded
    a, recs_t = _records(t, policy, [1, 2, 3], prompts, n)
    b, recs_m = _records(m, policy, [1, 2, 3], prompts, n)
    assert a == b
    for x, y in zip(recs_t, recs_m):
        # varentropy is E[(log p)^2] - H^2: its rounding error scales with E[(log p)^2]
        assert y.entropy == pytest.approx(x.entropy, abs=TOL) and y.varentropy == pytest.approx(x.varentropy, rel=TOL)
        assert y.logprob == pytest.approx(x.logprob, abs=TOL)
        assert [i for i, *_ in x.top] == [i for i, *_ in y.top]
    if name == "entropix":
        assert len({s for *_, s in a}) >= 4  # the comparison covered several strategies


def test_cot_decoding_same_branches_as_torch(pair):
    t, m = pair
    task = Task(prompts=[list(b"Q: 2+3? A:")], max_tokens=[8], seeds=[0], follow_up=False)
    res = [run(lm.engine(), decode(catalog.resolve("cot", lm, branches=4), task, lm.tokenizer, 512))[0] for lm in (t, m)]
    assert [b["text"] for b in res[0]["branches"]] == [b["text"] for b in res[1]["branches"]]


def test_mixed_policies_in_one_batch_same_as_torch(pair):
    """Rows of different policies share a step: each group's tokens land in its own rows."""
    t, m = pair
    cfg = SamplerConfig(model="tiny", low_ent=6.97, low_vent=2.6, med_ent=7.0, high_ent=7.09, med_vent=2.6,
                        high_vent=2.85)
    policies = [catalog.resolve("greedy", t).policy, Entropix(cfg, pause_id=-1),
                catalog.resolve("sample", t, temperature=0.9, top_k=20).policy]
    got = []
    for lm in (t, m):
        eng = lm.engine()
        eng.add([Request(prompt=list(b"abc" * (i + 1)), policy=p, max_tokens=10, seed=i, n=2 if i == 1 else 1,
                         stop_ids=frozenset()) for i, p in enumerate(policies)])
        out = []
        while eng.active:
            out.extend(eng.step())
        got.append([(r.choice, r.index, r.token, r.state) for r in out])
    assert got[0] == got[1] and len(got[0]) == 40

"""The torch backend's sampler ops: metrics with known answers, filters and draws that
reproduce their target distributions (chi-square), and the entropix decisions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from entropix.backends.torch import ops
from entropix.backends.torch.model import HeadStats
from entropix.decode.rng import uniforms
from entropix.sampler.config import SamplerConfig, SamplingParams
from entropix.sampler.policy import (ADAPTIVE, BRANCH, ENTROPIX_STATES, FLOWING, PAUSE, RESAMPLE, TREADING, Entropix,
                                     Sample, entropix_states)

NEG = float("-inf")
PROBS = torch.tensor([0.35, 0.25, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02])
PAUSE_ID = 7
CFG = SamplerConfig(model="test", low_ent=1.0, low_vent=1.0, med_ent=3.0, high_ent=5.0, med_vent=4.0, high_vent=8.0)


def draws(n: int, k: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(uniforms(np.arange(n, dtype=np.uint64) + seed * 1_000_003, np.zeros(n), k))


# -- logit metrics ------------------------------------------------------------------------

def metrics(logits):
    logp, H, V = ops.logit_metrics(logits)
    top = logp.topk(2, -1).values.exp()
    return H, V, top[:, 0] - top[:, 1]


@pytest.mark.parametrize("n", [2, 7, 64, 49152])
def test_uniform_over_n_has_entropy_log2_n_and_zero_varentropy(n):
    H, V, margin = metrics(torch.zeros(1, n))
    assert H.item() == pytest.approx(math.log2(n), abs=1e-4)
    assert V.item() == pytest.approx(0.0, abs=1e-4)
    assert margin.item() == pytest.approx(0.0, abs=1e-6)


def test_uniform_over_a_subset_ignores_masked_tokens():
    logits = torch.full((1, 1000), NEG)
    logits[0, 10:42] = 3.0  # 32 live tokens, the rest impossible
    H, V, _ = metrics(logits)
    assert H.item() == pytest.approx(5.0, abs=1e-5) and V.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.3])
def test_two_point_distribution(p):
    logits = torch.full((1, 50), NEG)
    logits[0, 3], logits[0, 17] = math.log(p), math.log(1 - p)
    H, V, margin = metrics(logits)
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    v = p * (1 - p) * (math.log2(p) - math.log2(1 - p)) ** 2  # variance of a two-valued surprisal
    assert H.item() == pytest.approx(h, abs=1e-5)
    assert V.item() == pytest.approx(v, abs=1e-4)
    assert margin.item() == pytest.approx(abs(2 * p - 1), abs=1e-5)


def test_fork_plus_tail_has_high_varentropy():
    # half the mass on one token, half spread over 4096: surprisal 1 or 13 bits, equally likely
    logits = torch.full((1, 5000), NEG)
    logits[0, :4097] = math.log(0.5 / 4096)
    logits[0, 0] = math.log(0.5)
    H, V, _ = metrics(logits)
    assert H.item() == pytest.approx(7.0, abs=1e-3) and V.item() == pytest.approx(36.0, abs=1e-2)


def test_rows_are_independent():
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 4
    both = metrics(logits)
    for i in range(3):
        alone = metrics(logits[i:i + 1])
        for a, b in zip(both, alone):
            assert a[i].item() == pytest.approx(b.item(), abs=1e-5)


# -- attention statistics -------------------------------------------------------------------

def test_attention_metrics_known_answers():
    # head 0 attends to one key (0 bits), head 1 to two keys evenly (1 bit); disjoint heads
    s = HeadStats(entropy=torch.tensor([[0.0, 1.0]]), deviation=torch.tensor([[1.0, 1.0]]),
                  interaction=torch.tensor([[2.0, 1.0]]))
    m = ops.attention_metrics([s], 1, "cpu")[0].tolist()
    assert m == pytest.approx([0.5, 0.25, 1.0, 1.5])
    # two layers are averaged
    m2 = ops.attention_metrics([s, HeadStats(s.entropy * 0 + 2, s.deviation * 0, s.interaction * 0)], 1, "cpu")
    assert m2[0].tolist() == pytest.approx([1.25, 0.125, 0.5, 0.75])


# -- filters and draws reproduce their target distributions -----------------------------

def target(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution each filter should leave, computed independently in numpy."""
    p = PROBS.double().numpy() ** (1.0 / temperature)
    p = p / p.sum()
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep[top_k:] = False  # PROBS is sorted
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if top_p < 1:
        keep &= (np.cumsum(q) - q) < top_p
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if min_p:
        keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


def sample_counts(n=20000, seed=0, **params) -> np.ndarray:
    logits = PROBS.log().expand(n, -1)
    logq = ops.filter_sorted(logits, params.get("temperature", 1.0), params.get("top_k", 0),
                             params.get("top_p", 1.0), params.get("min_p", 0.0))
    toks = ops.draw_sorted(logq, draws(n, seed=seed))[:, 0]
    return np.bincount(toks.numpy(), minlength=len(PROBS)).astype(float)


@pytest.mark.parametrize("params", [
    {"temperature": 1.0}, {"temperature": 0.5}, {"temperature": 1.7}, {"top_k": 3}, {"top_p": 0.7},
    {"top_p": 0.5, "temperature": 1.3}, {"min_p": 0.2}, {"top_k": 5, "top_p": 0.9, "min_p": 0.1, "temperature": 0.8},
])
def test_filters_reproduce_target_distribution(params):
    counts = sample_counts(**params)
    q = target(**params)
    assert counts[q == 0].sum() == 0, "a filtered-out token was drawn"
    nz = q > 0
    assert chisquare(counts[nz], q[nz] * counts.sum()).pvalue > 1e-3, (params, counts, q)


def test_chi_square_detects_a_wrong_distribution():
    """The test above can fail: samples at temperature 1 do not fit the temperature-0.5 target."""
    counts = sample_counts(temperature=1.0)
    assert chisquare(counts, target(temperature=0.5) * counts.sum()).pvalue < 1e-6


def test_sample_policy_on_unsorted_logits_reproduces_the_distribution():
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    logits = PROBS.log()[perm].expand(20000, -1)
    for params, q in ((SamplingParams(temperature=0.8, top_p=0.9), target(0.8, top_p=0.9)),
                      (SamplingParams(top_k=3), target(top_k=3))):
        toks = ops.sample_tokens(Sample(params), logits, draws(20000, seed=2))
        counts = np.bincount(perm[toks].numpy(), minlength=8).astype(float)  # back to PROBS order
        assert counts[q == 0].sum() == 0
        assert chisquare(counts[q > 0], q[q > 0] * counts.sum()).pvalue > 1e-3


def test_filter_edge_cases():
    lg = PROBS.log()[None]
    assert torch.allclose(ops.filter_sorted(lg, 1.0, 0, 1.0, 0.0).exp(), PROBS[None], atol=1e-6)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):  # top-1 and a tiny nucleus keep the most likely token
        lp = ops.filter_sorted(lg, 1.0, kw.get("top_k", 0), kw.get("top_p", 1.0), 0.0)
        assert torch.isfinite(lp).sum() == 1 and lp.argmax() == 0
    # a uniform at the very top of [0, 1) still picks a kept token
    lp = ops.filter_sorted(lg, 1.0, 3, 1.0, 0.0)
    assert ops.draw_sorted(lp, torch.tensor([[1 - 1e-12]], dtype=torch.float64)).item() == 2


def test_host_uniforms_are_uniform_and_per_row():
    u = uniforms(np.array([7], dtype=np.uint64), np.array([0]), 50000)[0]
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    assert chisquare(counts).pvalue > 1e-3 and 0 <= u.min() and u.max() < 1
    # draw k of a row depends on (seed, k) only
    both = uniforms(np.array([7, 9], dtype=np.uint64), np.array([3, 0]), 4)
    assert np.array_equal(both[0], uniforms(np.array([7], dtype=np.uint64), np.array([3]), 4)[0])
    assert not np.array_equal(both[0], both[1])


# -- entropix decisions ----------------------------------------------------------------------

def entropix(logits, H=None, V=None, flags=None, u=None, cfg=CFG, attn=None):
    policy = Entropix(cfg, PAUSE_ID)
    logp, h, v = ops.logit_metrics(logits)
    H = h if H is None else torch.tensor(H, dtype=torch.float32)
    V = v if V is None else torch.tensor(V, dtype=torch.float32)
    B = logits.shape[0]
    u = draws(B, cfg.n_candidates) if u is None else u
    attn = torch.zeros(B, 4) if attn is None else attn
    f = torch.zeros(B, 2, dtype=torch.bool) if flags is None else torch.tensor(flags, dtype=torch.bool)
    prev, ok = (x if x.any() else None for x in (f[:, 0], f[:, 1]))
    vals, idx = logp.topk(min(cfg.max_top_k, logits.shape[-1]), dim=-1)
    return ops.entropix_tokens(ops.entropix_table_tensors(policy, "cpu"), policy, vals, idx, H, V, attn, u, prev, ok)


def test_each_strategy_is_reached_from_constructed_metrics():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    H = [0.5, 6.0, 6.0, 2.0, 4.0, 2.0]
    V = [0.5, 2.0, 2.0, 10.0, 10.0, 3.0]
    flags = [[False, True], [False, True], [True, False], [False, True], [False, True], [False, True]]
    tokens, codes = entropix(logits, H, V, flags)
    assert [ENTROPIX_STATES[c] for c in codes.tolist()] == ["flowing", "pause", "treading", "branch", "resample",
                                                            "adaptive"]
    assert tokens[0].item() == logits[0].argmax().item()
    assert tokens[1].item() == PAUSE_ID and tokens[2].item() != PAUSE_ID
    # the host reference gives the same codes
    ok = np.array([f[1] for f in flags])
    assert entropix_states(CFG, np.array(H), np.array(V), ok).tolist() == codes.tolist()


def _mixture(vocab, top_p, tail):
    """top_p on token 0, the rest spread evenly over `tail` other tokens."""
    x = torch.full((vocab,), NEG)
    x[1:tail + 1] = math.log((1 - top_p) / tail)
    x[0] = math.log(top_p)
    return x


def test_each_strategy_is_reached_from_constructed_logits():
    vocab = 5000
    peaked = torch.zeros(vocab)
    peaked[42] = 30.0
    flat64 = torch.full((vocab,), NEG)
    flat64[100:164] = 0.0  # H = 6 bits, V = 0: uncertain and flat
    three = torch.full((vocab,), NEG)
    three[[10, 11, 12]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))  # in between
    logits = torch.stack([peaked, flat64, _mixture(vocab, 0.9, 4096), _mixture(vocab, 0.5, 4096), three])
    tokens, codes = entropix(logits, flags=[[False, True]] * 5)
    assert codes.tolist() == [FLOWING, PAUSE, BRANCH, RESAMPLE, ADAPTIVE]
    assert tokens[0].item() == 42 and tokens[1].item() == PAUSE_ID and tokens[4].item() in (10, 11, 12)


def test_the_pause_token_never_follows_itself():
    """A flowing row whose argmax is the pause token, right after a pause: it must take the next best
    (fails if the "no pause twice in a row" mask is removed)."""
    logits = torch.full((2, 300), NEG)
    logits[:, PAUSE_ID], logits[:, 3] = 20.0, 10.0
    tokens, codes = entropix(logits, H=[0.2, 0.2], V=[0.2, 0.2], flags=[[True, False], [False, True]])
    assert codes.tolist() == [FLOWING, FLOWING]
    assert tokens.tolist() == [3, PAUSE_ID]
    # the same for sampling strategies: a flat row just after a pause never draws it again
    flat = torch.full((400, 300), NEG)
    flat[:, :8] = 0.0
    tok, _ = entropix(flat, H=[2.0] * 400, V=[3.0] * 400, flags=[[True, False]] * 400)
    assert PAUSE_ID not in tok.tolist() and len(set(tok.tolist())) > 3


def test_best_of_n_keeps_the_best_scoring_candidate():
    """Adaptive rows draw n candidates and keep the best typicality-adjusted score, not the first
    draw (fails if the best-of-N selection is removed)."""
    cfg = dataclasses.replace(CFG, n_candidates=2, top_k=27, top_p=1.0, min_p=0.0, typicality_weight=2.0)
    logits = torch.full((1, 300), NEG)
    # H = about 1.3 bits: token 5 (p 0.6, surprisal 0.74) is typical; token 9 (p 0.05, 4.3 bits) is not
    for t, p in ((5, 0.6), (6, 0.35), (9, 0.05)):
        logits[0, t] = math.log(p)
    H = ops.logit_metrics(logits)[1]
    # candidate 0 lands in the last 5% of the (adapted) distribution: token 9; candidate 1 on token 5
    u = torch.tensor([[0.999, 0.1]], dtype=torch.float64)
    tokens, codes = entropix(logits, H=H.tolist(), V=[0.5], u=u, cfg=cfg)
    assert codes.tolist() == [ADAPTIVE]
    first = entropix(logits, H=H.tolist(), V=[0.5], u=u[:, :1], cfg=dataclasses.replace(cfg, n_candidates=1))[0]
    assert first.tolist() == [9] and tokens.tolist() == [5]


def test_best_of_n_score_depends_on_the_candidate():
    logq = torch.tensor([[-1.0, -1.0, -1.2]])  # two candidates equally likely under the adapted distribution
    model_logp = torch.tensor([[-0.1, -2.0, -2.1]]) * math.log(2)  # surprisals 0.1, 2.0, 2.1 bits
    score = ops.entropix_score(logq, model_logp, torch.tensor([2.0]), 0.5)
    assert score[0, 1] > score[0, 0] and score[0, 2] > score[0, 0]  # typical beats atypical, per candidate


def test_temperatures_and_filters_are_bounded():
    policy = Entropix(CFG)
    tab = ops.entropix_table_tensors(policy, "cpu")
    H = torch.tensor([0.5, 2.0, 4.0, 6.0, 2.5, 40.0])
    V = torch.tensor([0.5, 30.0, 30.0, 0.0, 6.0, 900.0])
    attn = torch.tensor([[20.0, 50.0, 0.0, 100.0]] * 6)
    code, temp, top_k, top_p, min_p = ops.entropix_plan(tab, policy, H, V, attn)
    assert set(code.tolist()) >= {FLOWING, BRANCH, RESAMPLE, TREADING, ADAPTIVE}
    assert (temp > 0).all() and (temp <= CFG.max_temperature).all()
    assert (top_k >= 1).all() and (top_k <= CFG.max_top_k).all()
    assert ((top_p > 0) & (top_p <= 1)).all() and ((min_p >= 0) & (min_p <= 0.5)).all()
    zero = torch.zeros(1, 4)
    t_lo = ops.entropix_plan(tab, policy, torch.tensor([2.0]), torch.tensor([3.0]), zero)[1]
    t_hi = ops.entropix_plan(tab, policy, torch.tensor([4.5]), torch.tensor([7.5]), zero)[1]
    assert t_lo.item() < t_hi.item() <= CFG.max_temperature  # hotter with uncertainty, up to the bound


def test_one_rows_metrics_never_steer_another():
    torch.manual_seed(3)
    logits = torch.randn(2, 400) * 2
    outs = set()
    for h, v in ((0.1, 0.1), (6.0, 1.0), (2.0, 20.0), (9.0, 30.0)):  # row 1 in every region
        tokens, codes = entropix(logits, [2.0, h], [3.0, v], flags=[[False, True]] * 2)
        outs.add((tokens[0].item(), codes[0].item()))
    assert len(outs) == 1


def test_same_draws_same_token_and_rows_draw_their_own_streams():
    logits = torch.zeros(2, 400)  # identical flat rows: only the draws differ
    a = [entropix(logits, [2.0, 2.0], [3.0, 3.0])[0].tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2] and a[0][0] != a[0][1]

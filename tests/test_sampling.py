"""Baseline samplers: each filter reproduces its target distribution (chi-square)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from entropix import EntropixError
from entropix.sampling import SamplingParams, draw, filter_logits, make_generator, make_sampler

PROBS = torch.tensor([0.35, 0.25, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02])
LOGITS = PROBS.log()
N = 20000


def target(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution each filter should leave, computed independently in numpy."""
    p = PROBS.double().numpy() ** (1.0 / temperature)
    p = p / p.sum()
    order = np.argsort(-p)
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0)
    q = q / q.sum()
    if top_p < 1:
        mass = 0.0
        for i in order:
            if not keep[i]:
                continue
            if mass >= top_p:
                keep[i] = False
            mass += q[i]
    q = np.where(keep, p, 0)
    q = q / q.sum()
    if min_p:
        keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


def sample_counts(n=N, seed=0, **params) -> np.ndarray:
    B = 500
    logits = LOGITS.expand(B, -1)
    args = [torch.full((B,), float(params.get("temperature", 1.0))),
            torch.full((B,), int(params.get("top_k", 0)), dtype=torch.long),
            torch.full((B,), float(params.get("top_p", 1.0))),
            torch.full((B,), float(params.get("min_p", 0.0)))]
    logp = filter_logits(logits, *args)
    gens = [make_generator(seed * 100_000 + b) for b in range(B)]
    counts = np.zeros(len(PROBS))
    for _ in range(n // B):
        toks = draw(logp, gens)
        counts += np.bincount(toks.numpy(), minlength=len(PROBS))
    return counts


@pytest.mark.parametrize("params", [
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 1.7},
    {"top_k": 3},
    {"top_p": 0.7},
    {"top_p": 0.5, "temperature": 1.3},
    {"min_p": 0.2},
    {"top_k": 5, "top_p": 0.9, "min_p": 0.1, "temperature": 0.8},
])
def test_filters_reproduce_target_distribution(params):
    counts = sample_counts(**params)
    q = target(**params)
    assert counts[q == 0].sum() == 0, "a filtered-out token was drawn"
    nz = q > 0
    res = chisquare(counts[nz], q[nz] * counts.sum())
    assert res.pvalue > 1e-3, (params, counts, q)


def test_chi_square_detects_a_wrong_distribution():
    """The test above can fail: samples at temperature 1 do not fit the temperature-0.5 target."""
    counts = sample_counts(temperature=1.0)
    q = target(temperature=0.5)
    assert chisquare(counts, q * counts.sum()).pvalue < 1e-6


def test_edge_cases():
    B = 1
    lg = LOGITS[None]
    one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    # top_p 1, top_k 0, min_p 0: nothing removed
    lp = filter_logits(lg, one(1.0), one(0, torch.long), one(1.0), one(0.0))
    assert torch.allclose(lp.exp(), PROBS[None], atol=1e-6)
    # top_k 1 keeps only the argmax
    lp = filter_logits(lg, one(1.0), one(1, torch.long), one(1.0), one(0.0))
    assert torch.isfinite(lp).sum() == 1 and lp.argmax() == 0
    # a tiny top_p still keeps the most likely token
    lp = filter_logits(lg, one(1.0), one(0, torch.long), one(1e-6), one(0.0))
    assert torch.isfinite(lp).sum() == 1 and lp.argmax() == 0
    # temperature 0 is greedy
    s = make_sampler("sample", temperature=0.0)
    assert s.params.greedy
    tok, _ = s(LOGITS.roll(3)[None].expand(4, -1), {}, [])
    assert tok.tolist() == [3, 3, 3, 3]
    assert B == 1


def test_same_seed_same_draws_and_rows_independent():
    logp = LOGITS[None].expand(3, -1)
    a = [draw(logp, [make_generator(5), make_generator(6), make_generator(7)]).tolist() for _ in range(1)]
    g = [make_generator(5), make_generator(6), make_generator(7)]
    b = [draw(logp, g).tolist()]
    assert a == b
    # a row's draws depend on its own generator only
    g1 = [make_generator(11) for _ in range(1)]
    g2 = [make_generator(99), make_generator(11)]
    seq1 = [draw(logp[:1], g1)[0].item() for _ in range(50)]
    seq2 = [draw(logp[:2], g2)[1].item() for _ in range(50)]
    assert seq1 == seq2


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2.0}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_parameters_raise_one_line(kw, msg):
    with pytest.raises(EntropixError, match=msg):
        SamplingParams(**kw)


def test_unknown_sampler():
    with pytest.raises(EntropixError, match="unknown sampler"):
        make_sampler("nope")

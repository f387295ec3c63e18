"""Lookahead: its choice is the best candidate by the scoring rule, checked against rollouts
made independently with greedy requests; calm rows are greedy; the rows never see a rollout
token; every record reports what its token cost in forward passes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from entropix import EntropixError
from entropix.decode.engine import Engine, generate
from entropix.decode.records import Request
from entropix.sampler import catalog
from entropix.sampler import lookahead as L
from entropix.sampler.lookahead import Lookahead
from entropix.sampler.policy import Greedy

from tinymodel import tiny_lm

PROMPTS = [[72, 105], [84, 104, 101, 32, 99, 97, 116]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


def decode(tiny, prompts, policy, max_tokens=6):
    reqs = [Request(prompt=list(p), policy=policy, max_tokens=max_tokens, top_logprobs=8) for p in prompts]
    out = {r.id: [] for r in reqs}
    for rec in generate(tiny.engine(), reqs):
        out[rec.request_id].append(rec)
    return [out[r.id] for r in reqs]


def expected_choice(tiny, prefix, root, policy):
    """The reference: roll every candidate out with a plain greedy request and score it."""
    cands = root.top[:policy.candidates]
    lps, ents = [], []
    for tok, _, lp in cands:
        recs = decode(tiny, [prefix + [tok]], Greedy(), max_tokens=policy.depth)[0]
        lps.append([lp] + [r.logprob for r in recs[:policy.depth - 1]])
        ents.append([r.entropy * math.log(2) for r in recs[:policy.depth]])  # records hold bits
    s = L.scores(np.array(lps), np.array(ents), policy.entropy_weight)
    return cands[int(np.argmax(s))][0], float(np.max(s)), int(np.argmax(s))


def test_search_picks_the_best_rollout(tiny):
    pol = Lookahead(candidates=3, depth=3, min_entropy=0.0)
    greedy = decode(tiny, PROMPTS, Greedy())
    got = decode(tiny, PROMPTS, pol)
    ranks = set()
    for prompt, recs, g in zip(PROMPTS, got, greedy):
        prefix = list(prompt)
        for rec in recs:
            # the root distribution is the one greedy decoding of the same prefix sees
            root = decode(tiny, [prefix], Greedy(), max_tokens=1)[0][0]
            tok, score, rank = expected_choice(tiny, prefix, root, pol)
            assert rec.state == "search" and rec.token == tok
            assert rec.extra["lookahead_score"] == pytest.approx(score, abs=1e-4)
            assert rec.extra["lookahead_forwards"] == 1 + pol.depth
            assert rec.extra["lookahead_rows"] == pol.candidates * pol.depth
            ranks.add(rank)
            prefix.append(rec.token)
    assert ranks != {0}  # the search did change a choice somewhere (else it proves nothing)


def test_calm_rows_are_greedy_and_cost_one_forward(tiny):
    greedy = decode(tiny, PROMPTS, Greedy())
    calm = decode(tiny, PROMPTS, Lookahead(min_entropy=1e9))
    one = decode(tiny, PROMPTS, Lookahead(candidates=1, min_entropy=0.0))
    for g, c, o in zip(greedy, calm, one):
        assert [r.token for r in c] == [r.token for r in g] == [r.token for r in o]
        assert all(r.state == "calm" and r.extra["lookahead_forwards"] == 1 for r in c)


def test_mixed_batch_with_other_samplers(tiny):
    """Rollouts run on a copy of the rows' cache: a greedy row in the same batch, and the
    searching rows themselves, continue exactly as if no rollout had happened."""
    pol = Lookahead(candidates=3, depth=2, min_entropy=0.0)
    alone_g = decode(tiny, [PROMPTS[1]], Greedy(), max_tokens=8)[0]
    alone_l = decode(tiny, [PROMPTS[0]], pol, max_tokens=8)[0]
    reqs = [Request(prompt=PROMPTS[0], policy=pol, max_tokens=8), Request(prompt=PROMPTS[1], policy=Greedy(), max_tokens=8)]
    out = {r.id: [] for r in reqs}
    for rec in generate(tiny.engine(), reqs):
        out[rec.request_id].append(rec.token)
    assert out[reqs[0].id] == [r.token for r in alone_l]
    assert out[reqs[1].id] == [r.token for r in alone_g]


def test_catalogue_and_errors(tiny):
    dec = catalog.resolve("lookahead", tiny)
    assert isinstance(dec.policy, Lookahead) and dec.strategy == "single"
    assert "lookahead" in [s["name"] for s in catalog.describe()]
    assert catalog.resolve("lookahead", tiny, sampler_config={"candidates": 2, "depth": 5}).policy == Lookahead(2, 5)
    with pytest.raises(EntropixError, match="candidates"):
        catalog.resolve("lookahead", tiny, sampler_config={"candidates": 0})
    with pytest.raises(EntropixError, match="keys among"):
        catalog.resolve("lookahead", tiny, sampler_config={"width": 3})
    with pytest.raises(EntropixError, match="min_entropy"):
        Lookahead(min_entropy=float("nan"))

    class OtherBackend:
        name, vocab_size, rows = "mlx", 256, 0

    with pytest.raises(EntropixError, match="lookahead sampler runs on the torch backend only, not mlx"):
        Engine(OtherBackend(), tiny.tokenizer, 512).validate(Request(prompt=[1], policy=Lookahead()))

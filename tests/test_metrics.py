"""Uncertainty metrics: known answers, and attention metrics that ignore padding and cache size."""

from __future__ import annotations

import math

import pytest
import torch

from entropix.metrics import ATTN_KEYS, attention_metrics, logit_metrics

NEG = float("-inf")


# -- logit metrics ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 7, 64, 49152])
def test_uniform_over_n_has_entropy_log2_n_and_zero_varentropy(n):
    m = logit_metrics(torch.zeros(1, n))
    assert m["entropy"].item() == pytest.approx(math.log2(n), abs=1e-4)
    assert m["varentropy"].item() == pytest.approx(0.0, abs=1e-4)
    assert m["margin"].item() == pytest.approx(0.0, abs=1e-6)


def test_uniform_over_a_subset_ignores_masked_tokens():
    logits = torch.full((1, 1000), NEG)
    logits[0, 10:42] = 3.0  # 32 live tokens, the rest impossible
    m = logit_metrics(logits)
    assert m["entropy"].item() == pytest.approx(5.0, abs=1e-5)
    assert m["varentropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(m["logz"]).all()


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.3])
def test_two_point_distribution(p):
    logits = torch.full((1, 50), NEG)
    logits[0, 3], logits[0, 17] = math.log(p), math.log(1 - p)
    m = logit_metrics(logits)
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    # surprisal is -log2 p w.p. p and -log2(1-p) w.p. 1-p: its variance
    v = p * (1 - p) * (math.log2(p) - math.log2(1 - p)) ** 2
    assert m["entropy"].item() == pytest.approx(h, abs=1e-5)
    assert m["varentropy"].item() == pytest.approx(v, abs=1e-4)
    assert m["margin"].item() == pytest.approx(abs(2 * p - 1), abs=1e-5)


def test_peaked_distribution_is_certain():
    logits = torch.zeros(1, 1000)
    logits[0, 5] = 60.0
    m = logit_metrics(logits)
    assert m["entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["varentropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["margin"].item() == pytest.approx(1.0, abs=1e-6)


def test_fork_plus_tail_has_high_varentropy():
    # half the mass on one token, half spread over 4096: surprisal 1 or 13 bits, equally likely
    logits = torch.full((1, 5000), NEG)
    logits[0, :4097] = math.log(0.5 / 4096)
    logits[0, 0] = math.log(0.5)
    m = logit_metrics(logits)
    assert m["entropy"].item() == pytest.approx(7.0, abs=1e-3)
    assert m["varentropy"].item() == pytest.approx(36.0, abs=1e-2)


def test_rows_are_independent_and_logz_is_the_normaliser():
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 4
    both = logit_metrics(logits)
    for i in range(3):
        alone = logit_metrics(logits[i:i + 1])
        for k in ("entropy", "varentropy", "margin", "logz"):
            assert both[k][i].item() == pytest.approx(alone[k].item(), abs=1e-5)
    assert torch.allclose(both["logz"], torch.logsumexp(logits, -1), atol=1e-5)


# -- attention metrics: known answers ---------------------------------------------------------

def test_attention_metrics_known_answers():
    S = 8
    valid = torch.ones(1, S, dtype=torch.bool)
    # head 0 looks at one key, head 1 spreads evenly over 2 keys
    probs = torch.zeros(1, 2, S)
    probs[0, 0, 0] = 1.0
    probs[0, 1, 2:4] = 0.5
    scores = torch.zeros(1, 2, S)
    scores[0, 0] = 2.0
    scores[0, 1] = -1.0
    m = attention_metrics(probs, scores, valid)
    assert m["attn_entropy"].item() == pytest.approx(0.5)  # mean of 0 and 1 bit
    assert m["attn_entropy_var"].item() == pytest.approx(0.25)  # variance of {0, 1}
    assert m["agreement"].item() == pytest.approx(1.0)  # disjoint heads: each is 1 away from the mean
    assert m["interaction"].item() == pytest.approx(1.5)  # mean |score| over heads and valid keys

    same = torch.zeros(1, 3, S)
    same[0, :, :4] = 0.25
    m = attention_metrics(same, torch.zeros(1, 3, S), valid)
    assert m["attn_entropy"].item() == pytest.approx(2.0)
    assert m["attn_entropy_var"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["agreement"].item() == pytest.approx(0.0, abs=1e-7)


def test_attention_metrics_ignore_invalid_slots():
    torch.manual_seed(1)
    B, H, S = 2, 4, 10
    scores = torch.randn(B, H, S)
    probs = scores.softmax(-1)
    valid = torch.ones(B, S, dtype=torch.bool)
    base = attention_metrics(probs, scores, valid)
    # the same attention with 7 empty cache slots after and 5 padding slots before
    pad = lambda x, v: torch.cat([torch.full((*x.shape[:-1], 5), v, dtype=x.dtype), x,
                                  torch.full((*x.shape[:-1], 7), v, dtype=x.dtype)], -1)
    m = attention_metrics(pad(probs, 0.0), pad(scores, 0.0), pad(valid, False))
    for k in ATTN_KEYS:
        assert torch.allclose(base[k], m[k], atol=1e-6), k


# -- attention metrics through the model -------------------------------------------------------

def _prefill_and_step(model, prompts, capacity=None, next_token=28):
    """Left-padded prefill of prompts (capturing the last layer), then one decode step."""
    P = max(len(p) for p in prompts)
    cache = model.new_cache(len(prompts), capacity or P + 1)
    toks = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, P - len(p):] = torch.tensor(p)
        cache.starts[b] = P - len(p)
    with torch.inference_mode():
        _, caps = model(toks, cache, capture_layers=(-1,))
        pre = attention_metrics(caps[len(model.layers) - 1].probs, caps[len(model.layers) - 1].scores,
                                caps[len(model.layers) - 1].valid)
        nxt = torch.full((len(prompts), 1), next_token, dtype=torch.long)
        _, caps = model(nxt, cache, capture_layers=(-1,))
        dec = attention_metrics(caps[len(model.layers) - 1].probs, caps[len(model.layers) - 1].scores,
                                caps[len(model.layers) - 1].valid)
    return pre, dec


@pytest.mark.slow
def test_attention_metrics_same_alone_padded_or_in_a_bigger_cache(lm):
    tok = lm.tokenizer
    short = tok.encode("The cat sat on the mat.")
    long = tok.encode("A much longer prompt, so that the short one is left-padded by many slots in the batch "
                      "and its keys sit far from the start of the cache.")
    assert len(long) > len(short) + 10
    alone_pre, alone_dec = _prefill_and_step(lm.model, [short])
    big_pre, big_dec = _prefill_and_step(lm.model, [short], capacity=2048)
    bat_pre, bat_dec = _prefill_and_step(lm.model, [long, short])
    for k in ATTN_KEYS:
        for ref, other in ((alone_pre, big_pre), (alone_dec, big_dec)):
            assert torch.allclose(ref[k], other[k], atol=1e-4, rtol=1e-4), k
        assert torch.allclose(alone_pre[k], bat_pre[k][1:], atol=1e-4, rtol=1e-4), k
        assert torch.allclose(alone_dec[k], bat_dec[k][1:], atol=1e-4, rtol=1e-4), k
    # attention entropy is bounded by the number of valid keys, not the cache size (defect 1)
    assert alone_dec["attn_entropy"].item() <= math.log2(len(short) + 1) + 1e-4
    assert bat_pre["attn_entropy"][0].item() != pytest.approx(bat_pre["attn_entropy"][1].item(), abs=1e-3)

"""Every weight mode runs everything it is offered for: ragged batches, forks, chunked prefill,
every multi-row strategy and the server, on tiny models quantized as `--quant` would.

Rows of different lengths write the KV cache through an indexed put, which does not promote
dtypes: a projection that hands back another dtype than the model's breaks exactly there."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from entropix.backends.torch import quant
from entropix.backends.torch.quant import quantize_model
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.decode.strategies import Task, decode, run
from entropix.sampler import catalog
from entropix.sampler.policy import Greedy

from tinymodel import tiny_lm

MODES = ["none", "int8", "int4"]
PROMPTS = [[65, 66, 67], [70 + i % 40 for i in range(11)], [90 + i % 30 for i in range(23)]]  # ragged
STOP = frozenset({0})
LONG = [40 + i % 80 for i in range(150)]  # past int4_wide.WIDE_ROWS: its prefill takes the dense int4 path

pytestmark = pytest.mark.skipif(not (quant.available("int8") and quant.available("int4")),
                                reason="this PyTorch lacks the CPU int8/int4 kernels")


def quantized(mode: str, **over):
    lm = tiny_lm(seed=2, fuse=True, **over)
    quantize_model(lm.model, mode)
    lm.quant = quant.quant_mode(lm.model)
    return lm


@pytest.fixture(scope="module", params=MODES)
def tiny_q(request):
    return quantized(request.param)


def greedy_tokens(tiny_q, prompts, max_tokens=8):
    reqs = [Request(prompt=p, policy=Greedy(), max_tokens=max_tokens, stop_ids=frozenset()) for p in prompts]
    order = {r.id: i for i, r in enumerate(reqs)}
    out: list[list[int]] = [[] for _ in prompts]
    for rec in generate(tiny_q.engine(), reqs):
        out[order[rec.request_id]].append(rec.token)
    return out


def test_the_modes_are_what_they_say(tiny_q):
    kinds = quant.weight_kinds(tiny_q.model)
    want = {"none": "dense", "int8": "int8", "int4": "int4"}[tiny_q.quant]
    assert kinds[want] > 0


def test_projections_and_the_cache_keep_the_models_activation_dtype(tiny_q):
    for m in tiny_q.model.modules():
        if isinstance(m, quant.QuantLinear):
            assert m(torch.randn(2, 5, m.in_features)).dtype == torch.float32
    cache = tiny_q.model.new_cache(2, 8)
    cache.starts = [3, 0]  # ragged: the indexed write
    with torch.inference_mode():
        tiny_q.model(torch.tensor([[0, 0, 0, 5], [6, 7, 8, 9]]), cache)
        tiny_q.model(torch.tensor([[1], [2]]), cache)
    assert cache.k.dtype == cache.v.dtype == torch.float32 and torch.isfinite(cache.k).all()


def test_rows_that_join_mid_decode_write_the_cache_at_their_own_lengths(tiny_q):
    """A request added while another decodes (the server's continuous batching, CoT follow-ups):
    rows of different lengths in one step, the indexed cache write."""
    eng = tiny_q.engine()
    prompts = PROMPTS + [LONG]
    reqs = [Request(prompt=p, policy=Greedy(), max_tokens=8, stop_ids=frozenset()) for p in prompts]
    got: dict[str, list[int]] = {r.id: [] for r in reqs}
    for r in reqs:
        eng.add([r])
        for _ in range(2):
            for rec in eng.step():
                got[rec.request_id].append(rec.token)
    while eng.active:
        for rec in eng.step():
            got[rec.request_id].append(rec.token)
    assert [got[r.id] for r in reqs] == [greedy_tokens(tiny_q, [p])[0] for p in prompts]


def test_a_ragged_batch_gives_each_rows_own_tokens(tiny_q):
    both = greedy_tokens(tiny_q, PROMPTS)
    assert [greedy_tokens(tiny_q, [p])[0] for p in PROMPTS] == both
    assert all(len(t) == 8 for t in both)


@pytest.mark.parametrize("sampler, given", [
    ("cot", {"branches": 3}), ("cot-agg", {"branches": 3}), ("self-consistency", {"samples": 3, "temperature": 0.8}),
    ("auto", {"branches": 3}), ("entropix-branching", {}),
])
def test_every_strategy_over_ragged_prompts_matches_each_alone(tiny_q, sampler, given):
    dec = catalog.resolve(sampler, tiny_q, **given)
    seeds = [3, 4, 5]

    def results(idx):
        task = Task([PROMPTS[i] for i in idx], [6] * len(idx), [seeds[i] for i in idx], STOP)
        return run(tiny_q.engine(dec.capture_layers), decode(dec, task, tiny_q.tokenizer, 512))

    together = results([0, 1, 2])
    assert len(together) == 3 and all(r["tokens_generated"] > 0 for r in together)
    for i, res in enumerate(together):
        alone = results([i])[0]
        assert [b["tokens"] for b in alone["branches"]] == [b["tokens"] for b in res["branches"]]
        assert alone.get("answer") == res.get("answer")


@pytest.mark.parametrize("sampler", ["entropix", "entropix-logits", "dslider", "lookahead", "min-p"])
def test_one_row_samplers_over_a_ragged_batch_match_each_alone(tiny_q, sampler):
    dec = catalog.resolve(sampler, tiny_q)

    def tokens(idx):
        reqs = [Request(prompt=PROMPTS[i], policy=dec.policy, max_tokens=6, seed=10 + i, stop_ids=frozenset())
                for i in idx]
        order = {r.id: j for j, r in enumerate(reqs)}
        out: list[list[int]] = [[] for _ in idx]
        for rec in generate(tiny_q.engine(dec.capture_layers), reqs):
            out[order[rec.request_id]].append(rec.token)
        return out

    together = tokens([0, 1, 2])
    assert all(len(t) == 6 for t in together)
    assert [tokens([i])[0] for i in range(3)] == together


def test_forks_copy_a_rows_cache_under_every_mode(tiny_q):
    """n rows of one prompt share its prefill (a fork of the cache): greedy rows stay identical."""
    req = Request(prompt=PROMPTS[1], policy=Greedy(), n=3, max_tokens=6, stop_ids=frozenset())
    rows: dict[int, list[int]] = {}
    for rec in generate(tiny_q.engine(), [req]):
        rows.setdefault(rec.choice, []).append(rec.token)
    assert len(rows) == 3 and len({tuple(t) for t in rows.values()}) == 1
    assert rows[0] == greedy_tokens(tiny_q, [PROMPTS[1]], 6)[0]


@pytest.mark.parametrize("mode", MODES)
def test_the_server_takes_concurrent_ragged_requests_with_chunked_prefill(mode):
    """Two requests of different lengths at once, one read in prefill chunks, and auto, CoT and
    entropix with attention: all answer 200 under every mode."""
    import httpx

    from entropix.serve import ServerThread, create_app

    lm = quantized(mode, max_position_embeddings=1024)
    short = [{"role": "user", "content": "2 + 3?"}]
    long = [{"role": "user", "content": "Count the apples: " + "apple " * 40 + "How many?"}]
    bodies = [{"messages": short, "max_tokens": 6}, {"messages": long, "max_tokens": 6},
              {"messages": short, "max_tokens": 12, "sampler": "auto", "branches": 3},
              {"messages": long, "max_tokens": 5, "sampler": "cot", "branches": 3},
              {"messages": short, "max_tokens": 5, "sampler": "entropix", "seed": 1}]
    with ServerThread(create_app(lm, max_rows=16, max_n=4, prefill_chunk=16)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as http:
        def post(body):
            return http.post("/v1/chat/completions", json={"model": lm.name, **body})

        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(post, bodies))
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0


def test_quantized_records_stay_finite(tiny_q):
    dec = catalog.resolve("entropix", tiny_q)
    reqs = [Request(prompt=p, policy=dec.policy, max_tokens=6, seed=1, stop_ids=STOP) for p in PROMPTS]
    recs = list(generate(tiny_q.engine(dec.capture_layers), reqs))
    assert recs and all(math.isfinite(r.entropy) and math.isfinite(r.varentropy) for r in recs)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_bf16_model_keeps_bf16_activations_under_a_quantized_mode(mode):
    """A bf16 checkpoint asked for --quant int8/int4: the projections hand back bf16 (the model's
    dtype), so the cache stays bf16 and rows joining mid-decode still match each alone."""
    lm = tiny_lm(seed=2, fuse=True, dtype=torch.bfloat16)
    quantize_model(lm.model, mode)
    assert lm.model.dtype == torch.bfloat16
    eng = lm.engine()
    reqs = [Request(prompt=p, policy=Greedy(), max_tokens=6, stop_ids=frozenset()) for p in PROMPTS[:2]]
    got: dict[str, list[int]] = {r.id: [] for r in reqs}
    for r in reqs:
        eng.add([r])
        for rec in eng.step():
            got[rec.request_id].append(rec.token)
    while eng.active:
        for rec in eng.step():
            got[rec.request_id].append(rec.token)
    assert [got[r.id] for r in reqs] == [greedy_tokens(lm, [p], 6)[0] for p in PROMPTS[:2]]

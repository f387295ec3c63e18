"""The engine against transformers: logits, greedy text, KV cache, batching."""

from __future__ import annotations

import pytest
import torch

from entropix.generate import Engine, Request, generate
from entropix.sampling import make_sampler
from entropix.weights import load_model

from tiny import write_hf_model

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based inks and a wooden press adapted from wine making, so that "
          "books which had taken scribes months to copy could be produced in days, and within fifty years "
          "presses were at work in more than two hundred cities across Europe.")


def _logits_full(lm, ids: torch.Tensor) -> torch.Tensor:
    cache = lm.model.new_cache(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        logits, _ = lm.model(ids, cache, last_only=False)
    return logits


def test_embedded_gguf_logits_match_transformers(lm, hf_model):
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)[:50]])
    assert ids.shape[1] == 50
    ours = _logits_full(lm, ids)
    with torch.inference_mode():
        ref = hf_model(ids).logits
    assert (ours - ref).abs().max().item() < 1e-3


def test_tiny_llama3_scaled_checkpoint_matches_transformers(tmp_path, gguf_path):
    from transformers import AutoModelForCausalLM

    folder = write_hf_model(tmp_path / "tiny", gguf_path)
    ours = load_model(str(folder), device="cpu", dtype="float32", progress=False)
    assert ours.config.rope_type == "llama3" and ours.config.rope_factor == 8.0
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # long enough that positions pass the original context where the scaling matters
    ids = torch.randint(3, 40000, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids).logits
    assert (_logits_full(ours, ids) - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_greedy_64_tokens_identical_to_transformers(lm, hf_model):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    req = Request(prompt=ids, sampler=make_sampler("greedy"), max_tokens=64, stop_ids=frozenset())
    ours = [r.token for r in generate(Engine(lm), [req])]
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
    assert ours == out[0, len(ids):].tolist()


def test_prefill_then_decode_equals_full_forward(lm):
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)[:40]])
    full = _logits_full(lm, ids)
    cache = lm.model.new_cache(1, 8)  # small on purpose: the cache must grow
    with torch.inference_mode():
        first, _ = lm.model(ids[:, :30], cache, last_only=False)
        steps = [lm.model(ids[:, j:j + 1], cache, last_only=False)[0] for j in range(30, 40)]
    got = torch.cat([first] + steps, dim=1)
    assert cache.lengths == [40]
    assert (got - full).abs().max().item() < 1e-4


def test_batch_of_different_lengths_matches_each_alone(lm):
    tok = lm.tokenizer
    prompts = ["Hi!", "Name three colours of the rainbow.",
               "Explain in one sentence why the sky is blue during the day.", "2+2="]
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    assert len({len(i) for i in ids}) == 4

    def run(batch):
        reqs = [Request(prompt=i, sampler=make_sampler("greedy"), max_tokens=24, stop_ids=frozenset()) for i in batch]
        out = {r.id: [] for r in reqs}
        engine = Engine(lm)
        for rec in generate(engine, reqs):
            out[rec.request_id].append(rec.token)
        return [out[r.id] for r in reqs]

    together = run(ids)
    alone = [run([i])[0] for i in ids]
    assert together == alone
    assert all(len(t) == 24 for t in together)


def test_rows_of_different_lengths_in_one_cache_keep_their_logits(lm):
    """A request admitted mid-generation (scheduler) sees exactly what it would alone."""
    tok = lm.tokenizer
    a = tok.encode("Once upon a time, in a small village by the sea,")
    b = tok.encode("The capital of France is")
    greedy = make_sampler("greedy")
    engine = Engine(lm)
    ra = Request(prompt=a, sampler=greedy, max_tokens=12, stop_ids=frozenset())
    rb = Request(prompt=b, sampler=greedy, max_tokens=8, stop_ids=frozenset())
    engine.add([ra])
    got = {ra.id: [], rb.id: []}
    for _ in range(3):
        for rec in engine.step():
            got[rec.request_id].append(rec.token)
    engine.add([rb])
    while engine.active:
        for rec in engine.step():
            got[rec.request_id].append(rec.token)
    alone_b = [r.token for r in generate(Engine(lm), [Request(prompt=b, sampler=greedy, max_tokens=8,
                                                               stop_ids=frozenset())])]
    alone_a = [r.token for r in generate(Engine(lm), [Request(prompt=a, sampler=greedy, max_tokens=12,
                                                               stop_ids=frozenset())])]
    assert got[rb.id] == alone_b
    assert got[ra.id] == alone_a


def test_records_carry_logprobs_and_stop(lm):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Say hello."}])
    recs = list(generate(Engine(lm), [Request(prompt=ids, sampler=make_sampler("greedy"), max_tokens=48,
                                              stop_ids=lm.tokenizer.stop_ids, top_logprobs=3)]))
    assert recs[-1].finish_reason in ("stop", "length")
    for r in recs:
        assert r.logprob <= 0 and len(r.top) == 3
        assert r.top[0][0] == r.token  # greedy picks the most likely token
        assert abs(r.top[0][2] - r.logprob) < 1e-6
        assert r.entropy >= 0 and r.varentropy >= 0

"""The torch model against transformers (logits, greedy text, attention), its KV cache and
the newest query's attention statistics."""

from __future__ import annotations

import math

import pytest
import torch

from entropix.backends.torch import ops
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.sampler.policy import Greedy

from tinymodel import tiny_lm, tiny_model

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based inks and a wooden press adapted from wine making, so that "
          "books which had taken scribes months to copy could be produced in days, and within fifty years "
          "presses were at work in more than two hundred cities across Europe.")


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        return model(ids, cache, last_only=False)[0]


def hf_twin(model):
    """transformers' LlamaForCausalLM with the same weights (eager attention, to return attentions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                      tie_word_embeddings=False, attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd)
    return hf


@pytest.fixture(scope="module")
def tiny_net():
    return tiny_model(seed=1)


def test_tiny_model_matches_transformers_fused_or_not(tiny_net):
    hf = hf_twin(tiny_net)
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(ids).logits
    assert (full_logits(tiny_net, ids) - ref).abs().max().item() < 1e-4
    fused = tiny_model(seed=1, fuse=True)
    assert fused.layers[0].self_attn.qkv_proj is not None and not hasattr(fused.layers[0].self_attn, "q_proj")
    assert (full_logits(fused, ids) - ref).abs().max().item() < 1e-4


def test_cpu_linear_paths_give_the_same_numbers():
    """The chunked decode-batch path is F.linear bit for bit; the packed output projection agrees to rounding."""
    from entropix.backends.torch.layers import Linear, PackedLinear

    lin = Linear(64, 1200, bias=False)
    for rows in (1, 4, 10, 12, 13):
        x = torch.randn(rows, 1, 64)
        with torch.inference_mode():
            assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    x = torch.randn(6, 64)
    lin(x).sum().backward()  # with autograd on it takes F.linear (out= products have no gradient)
    assert lin.weight.grad is not None and lin.weight.grad.shape == lin.weight.shape
    model = tiny_model(seed=1)
    ids = torch.randint(1, 256, (3, 12), generator=torch.Generator().manual_seed(4))
    plain = full_logits(model, ids)
    assert model.pack_output() and isinstance(model.lm_head, PackedLinear)
    assert (full_logits(model, ids) - plain).abs().max().item() < 1e-5


def test_newest_query_statistics_match_transformers_attentions(tiny_net):
    """Our in-layer statistics equal those computed from transformers' full attention matrix."""
    hf = hf_twin(tiny_net)
    ids = torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        p = hf(ids, output_attentions=True).attentions[-1][:, :, -1].double()  # [1, H, S]
        cache = tiny_net.new_cache(1, 30)
        _, stats = tiny_net(ids, cache, capture_layers=(-1,))
        nxt = torch.tensor([[7]])
        ref_next = hf(torch.cat([ids, nxt], 1)).logits[:, -1]
        got_next, _ = tiny_net(nxt, cache, capture_layers=(-1,))  # a decode step takes the explicit path
    assert (got_next - ref_next).abs().max().item() < 1e-4
    s = stats[len(tiny_net.layers) - 1]
    ent = -(p * torch.log2(p.clamp_min(1e-300))).sum(-1)
    dev = (p - p.mean(1, keepdim=True)).abs().sum(-1)
    assert torch.allclose(s.entropy.double(), ent, atol=1e-4)
    assert torch.allclose(s.deviation.double(), dev, atol=1e-4)
    assert s.entropy.max().item() <= math.log2(30) + 1e-4


def test_prefill_then_decode_equals_full_forward(tiny_net):
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    full = full_logits(tiny_net, ids)
    cache = tiny_net.new_cache(1, 8)  # small on purpose: the cache must grow
    with torch.inference_mode():
        first, _ = tiny_net(ids[:, :30], cache, last_only=False)
        steps = [tiny_net(ids[:, j:j + 1], cache, last_only=False)[0] for j in range(30, 40)]
    assert cache.lengths == [40]
    assert (torch.cat([first] + steps, dim=1) - full).abs().max().item() < 1e-4


def _prefill_and_step(model, prompts, capacity=None, next_token=28):
    """Left-padded prefill of prompts (capturing the last layer), then one decode step: metrics [B, 4] twice."""
    P = max(len(p) for p in prompts)
    cache = model.new_cache(len(prompts), capacity or P + 1)
    toks = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, P - len(p):] = torch.tensor(p)
        cache.starts[b] = P - len(p)
    out = []
    with torch.inference_mode():
        for t in (toks, torch.full((len(prompts), 1), next_token, dtype=torch.long)):
            _, stats = model(t, cache, capture_layers=(-1,))
            out.append(ops.attention_metrics(list(stats.values()), len(prompts), "cpu"))
    return out


def test_attention_metrics_same_alone_padded_or_in_a_bigger_cache(tiny_net):
    short, long = list(range(40, 50)), list(range(60, 90))
    alone = _prefill_and_step(tiny_net, [short])
    big = _prefill_and_step(tiny_net, [short], capacity=2048)
    batch = _prefill_and_step(tiny_net, [long, short])
    for a, b, c in zip(alone, big, batch):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c[1:], atol=1e-5)
    # attention entropy is bounded by the number of valid keys, not the cache size
    assert alone[1][0, 0].item() <= math.log2(len(short) + 1) + 1e-4
    assert batch[0][0, 0].item() != pytest.approx(batch[0][1, 0].item(), abs=1e-3)


@pytest.mark.slow
def test_embedded_gguf_logits_match_transformers(smol, hf_model):
    ids = torch.tensor([smol.tokenizer.encode(PROMPT)[:50]])
    assert ids.shape[1] == 50
    with torch.inference_mode():
        ref = hf_model(ids).logits
    assert (full_logits(smol.model, ids) - ref).abs().max().item() < 1e-3


def _greedy_equals_transformers(lm, hf, ids, n):
    ours = [r.token for r in generate(lm.engine(), [Request(prompt=ids, policy=Greedy(), max_tokens=n,
                                                            stop_ids=frozenset())])]
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
    assert len(ours) == n and ours == out[0, len(ids):].tolist()


def test_greedy_64_tokens_identical_to_transformers_tiny():
    lm = tiny_lm(seed=1)
    _greedy_equals_transformers(lm, hf_twin(lm.model), list(b"Write a short poem about the sea."), 64)


@pytest.mark.slow
def test_greedy_identical_to_transformers(smol, hf_model):
    """A smoke test of 16 tokens on the embedded model (64 on the tiny one, above)."""
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    _greedy_equals_transformers(smol, hf_model, ids, 16)


@pytest.mark.slow
def test_embedded_model_batch_of_different_lengths_matches_each_alone(smol):
    tok = smol.tokenizer
    prompts = ["Hi!", "Name three colours of the rainbow.", "Explain in one sentence why the sky is blue.", "2+2="]
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]

    def run(batch):
        reqs = [Request(prompt=i, policy=Greedy(), max_tokens=4) for i in batch]  # a smoke test: test_engine.py's at length
        out = {r.id: [] for r in reqs}
        for rec in generate(smol.engine(), reqs):
            out[rec.request_id].append(rec.token)
        return [out[r.id] for r in reqs]

    assert run(ids) == [run([i])[0] for i in ids]

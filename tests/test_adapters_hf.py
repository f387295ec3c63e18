"""The transformers adapter: the logits processor and the full-sampler wrapper."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from entropix.adapters import hf
from entropix.backends.torch.backend import TorchBackend
from entropix.backends.torch.model import Transformer
from entropix.config import ModelConfig
from entropix.decode.engine import Engine, generate
from entropix.decode.records import Request
from entropix.sampler.config import SamplerConfig, load_profile
from entropix.sampler.policy import Entropix
from tinymodel import ByteTokenizer

pytestmark = pytest.mark.slow  # an engine adapter: transformers (make test-fast leaves it out)

# thresholds for a tiny random model's flat distributions: every strategy fires
TINY_CFG = SamplerConfig(low_ent=3.0, low_vent=5.0, med_ent=3.9, high_ent=4.3, med_vent=6.0, high_vent=6.3,
                         pause_text="~")
STORY = "Write a long story about a robot who learns to paint, with many details."


@pytest.fixture(scope="module")
def tiny_pair():
    """The same random Llama as a transformers model and as ours (HF names, without "model.")."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
    theirs = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    ours = Transformer(ModelConfig(**cfg))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()}, strict=False)
    ours.finish_setup()
    return theirs, ours.eval()


def _our_records(model, policy, prompt, n_tokens, seed, layers=(-1,)):
    engine = Engine(TorchBackend(model, layers), ByteTokenizer(), 512)
    return list(generate(engine, [Request(prompt=prompt, policy=policy, max_tokens=n_tokens, seed=seed,
                                          stop_ids=frozenset())]))


def test_full_wrapper_matches_our_engine_on_a_tiny_model(tiny_pair):
    theirs, ours = tiny_pair
    prompt = list(b"Once upon a time")
    want = _our_records(ours, Entropix(TINY_CFG, ByteTokenizer().find_token("~")), prompt, 40, seed=3)
    got = list(hf.generate(theirs, ByteTokenizer(), prompt, sampler="entropix", max_tokens=40, seed=3,
                           sampler_config=TINY_CFG))
    assert len({r.state for r in want}) >= 4  # the comparison covers several strategies
    assert [r.state for r in got] == [r.state for r in want]
    assert [r.token for r in got] == [r.token for r in want]
    for a, b in zip(got, want):
        assert a.attn is not None and b.attn is not None  # the full sampler: attention metrics captured
        for key in a.attn:
            assert a.attn[key] == pytest.approx(b.attn[key], rel=1e-3, abs=1e-3)
        assert a.entropy == pytest.approx(b.entropy, abs=1e-3)  # large random weights amplify fp32 noise


def test_full_wrapper_forks_as_our_engine_does(tiny_pair):
    from entropix.sampler.config import BranchingConfig

    theirs, ours = tiny_pair
    prompt = list(b"In the beginning")
    engine = Engine(TorchBackend(ours, (-1,)), ByteTokenizer(), 512)
    req = Request(prompt=prompt, policy=Entropix(TINY_CFG, ord("~")), max_tokens=16, seed=2, stop_ids=frozenset(),
                  branching=BranchingConfig())
    want = list(generate(engine, [req]))
    got = list(hf.generate(theirs, ByteTokenizer(), prompt, sampler="entropix-branching", max_tokens=16, seed=2,
                           sampler_config=TINY_CFG))
    assert any(r.parent is not None for r in want)  # it forked
    key = [(r.choice, r.index, r.token, r.state, r.parent) for r in want]
    assert [(r.choice, r.index, r.token, r.state, r.parent) for r in got] == key


def test_captured_attention_is_output_attentions_last_layer(tiny_pair):
    """The wrapper's attn_entropy is that of the last layer's attention that
    `output_attentions` returns under eager attention."""
    theirs, _ = tiny_pair
    prompt = list(b"Hello there")
    rec = next(hf.generate(theirs, ByteTokenizer(), prompt, sampler="entropix", max_tokens=1, seed=0,
                           sampler_config=TINY_CFG))
    with torch.no_grad():
        att = theirs(torch.tensor([prompt]), output_attentions=True).attentions[-1][0, :, -1]  # [H, S]
    ent = -(att * att.clamp_min(1e-30).log2()).sum(-1)
    assert rec.attn["attn_entropy"] == pytest.approx(float(ent.mean()), abs=1e-4)
    assert rec.attn["attn_entropy_var"] == pytest.approx(float(ent.var(unbiased=False)), abs=1e-4)


def test_processor_matches_logits_only_engine_on_a_tiny_model(tiny_pair):
    theirs, ours = tiny_pair
    prompt = list(b"The weather today")
    cfg = TINY_CFG
    want = _our_records(ours, Entropix(cfg, ord("~"), attention=False), prompt, 40, seed=11)
    proc = hf.EntropixLogitsProcessor(cfg, seed=11, pause_id=ord("~"))
    out = theirs.generate(torch.tensor([prompt]), logits_processor=LogitsProcessorList([proc]), do_sample=False,
                          max_new_tokens=40, pad_token_id=0, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == [r.token for r in want]
    assert [s for _, s, _, _ in proc.history[0]] == [r.state for r in want]
    assert len({r.state for r in want}) >= 4


def test_processor_rows_have_their_own_streams(tiny_pair):
    theirs, _ = tiny_pair
    prompt = torch.tensor([list(b"abc")] * 3)
    runs = []
    for _ in range(2):
        proc = hf.EntropixLogitsProcessor(TINY_CFG, seed=5)
        runs.append(theirs.generate(prompt, logits_processor=LogitsProcessorList([proc]), do_sample=False,
                                    max_new_tokens=24, pad_token_id=0, eos_token_id=None)[:, 3:].tolist())
    assert runs[0] == runs[1]  # reproducible from the seed
    assert len({tuple(r) for r in runs[0]}) > 1  # equal prompts, different rows: different streams


def test_wrapper_rejects_multi_row_samplers(tiny_pair):
    theirs, _ = tiny_pair
    from entropix import EntropixError

    for name in ("cot", "self-consistency"):  # CoT branches, best-of-N answers
        with pytest.raises(EntropixError, match="single-row"):
            list(hf.generate(theirs, ByteTokenizer(), [1, 2, 3], sampler=name, max_tokens=2))


# -- the embedded model, loaded by transformers from its GGUF -----------------------------------

def test_processor_gives_the_cli_no_attention_tokens(hf_model, gguf_path, smol, cli_load_once, capsys):
    """Must-show: transformers + EntropixLogitsProcessor + seed == `entropix generate
    --sampler entropix --no-attention --seed S` token for token, 48 tokens."""
    from entropix import cli
    from tiny import hf_gguf_tokenizer

    assert cli.main(["generate", STORY, "--sampler", "entropix", "--no-attention", "--seed", "7",
                     "--max-tokens", "48", "--json", "--quant", "none", "--dtype", "float32",
                     "--device", "cpu"]) == 0  # as transformers computes: fp32 (the session's smol)
    res = json.loads(capsys.readouterr().out)
    assert res["sampler"] == "entropix-logits" and len(res["tokens"]) == 48
    assert all("attn_entropy" not in r for r in res["records"])
    cfg = load_profile(smol.name)
    tok = hf_gguf_tokenizer(gguf_path)
    pid = hf.pause_token_id(tok, cfg)
    assert pid == smol.tokenizer.find_token(cfg.pause_text)
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": STORY}])
    proc = hf.EntropixLogitsProcessor(cfg, seed=7, pause_id=pid)
    out = hf_model.generate(torch.tensor([ids]), logits_processor=LogitsProcessorList([proc]), do_sample=False,
                            max_new_tokens=48, pad_token_id=tok.eos_token_id)
    assert out[0, len(ids):].tolist() == res["tokens"]
    assert [s for _, s, _, _ in proc.history[0]] == [r["state"] for r in res["records"]]


def test_full_wrapper_gives_our_engine_states_on_the_embedded_model(hf_model, gguf_path, smol):
    """A smoke test of 24 tokens (the tiny model's tests above carry the claim in full)."""
    from tiny import hf_gguf_tokenizer

    cfg = load_profile(smol.name)
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": STORY}])
    policy = Entropix(cfg, smol.tokenizer.find_token(cfg.pause_text))
    engine = smol.engine(cfg.attention_layers)
    want = list(generate(engine, [Request(prompt=ids, policy=policy, max_tokens=24, seed=7,
                                          stop_ids=smol.tokenizer.stop_ids)]))
    got = list(hf.generate(hf_model, hf_gguf_tokenizer(gguf_path), ids, max_tokens=24, seed=7, sampler_config=cfg))
    assert [r.state for r in got] == [r.state for r in want]
    assert [r.token for r in got] == [r.token for r in want]
    assert all(r.attn is not None for r in got)

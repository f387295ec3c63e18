"""The mlx-lm adapter: mlx_lm.generate with the entropix sampler on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from entropix.sampler.config import SamplerConfig
from entropix.sampler.policy import ENTROPIX_STATES, Entropix

pytestmark = pytest.mark.slow  # an engine adapter: mlx-lm (make test-fast leaves it out)

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    """A random Llama written by transformers (fp32 safetensors + the embedded tokenizer), its
    output layer scaled up so that its distributions range from peaked to flat."""
    from safetensors.numpy import load_file, save_file
    from tiny import write_hf_model

    folder = write_hf_model(tmp_path_factory.mktemp("mlx") / "tiny", gguf_path, rope_scaling=None, seed=4)
    w = load_file(folder / "model.safetensors")
    w["lm_head.weight"] = w["lm_head.weight"] * 8
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})
    # transformers 5 writes rope_theta inside rope_parameters; mlx-lm 0.32 reads it at the top
    # level (else it silently uses 10000)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    import mlx_lm

    return mlx_lm.load(str(tiny_hf))


@pytest.fixture(scope="module")
def cfg(loaded):
    """Thresholds around this random model's own entropies, so that several states fire."""
    return SamplerConfig(low_ent=3.4, low_vent=10.0, med_ent=4.5, high_ent=5.3, med_vent=11.5, high_vent=10.5)


def _run(loaded, n=24, **kw):
    """mlx_lm.stream_generate: (text, emitted tokens). mlx-lm computes one step ahead, so a
    sampler is called once more than tokens come out."""
    import mlx_lm

    model, tok = loaded
    out = list(mlx_lm.stream_generate(model, tok, PROMPT, max_tokens=n, **kw))
    return "".join(r.text for r in out), [int(r.token) for r in out]


def test_mlx_lm_generate_with_the_entropix_sampler(loaded, cfg):
    from entropix.adapters.mlxlm import entropix_sampler

    import mlx_lm

    s = entropix_sampler(cfg, seed=3)
    model, tok = loaded
    text = mlx_lm.generate(model, tok, PROMPT, max_tokens=24, sampler=s)  # the plain entry point
    assert isinstance(text, str) and text
    assert all(st in ENTROPIX_STATES for _, st in s.history)
    again = entropix_sampler(cfg, seed=3)
    text2, tokens = _run(loaded, sampler=again)
    assert text2 == text and tokens == [t for t, _ in again.history[:len(tokens)]]  # seeded: reproducible
    assert again.history[:len(tokens)] == s.history[:len(tokens)]
    other = entropix_sampler(cfg, seed=4)
    assert _run(loaded, sampler=other)[1] != tokens


def test_mlx_logits_processor_forces_the_same_choice(loaded, cfg):
    from entropix.adapters.mlxlm import EntropixLogitsProcessor, entropix_sampler

    _, want = _run(loaded, sampler=entropix_sampler(cfg, seed=8))
    proc = EntropixLogitsProcessor(cfg, seed=8)
    _, got = _run(loaded, logits_processors=[proc])  # mlx-lm's own greedy sampler takes what it leaves
    assert got == want and len(want) == 24


def test_mlx_lm_tokens_are_our_engine_logits_only_tokens(loaded, tiny_hf, cfg):
    """The same checkpoint through mlx-lm + the sampler and through our torch engine with
    logits-only entropix: the same tokens (float ties aside, none with this seed)."""
    from entropix.adapters.mlxlm import entropix_sampler
    from entropix.decode.engine import generate
    from entropix.decode.records import Request
    from entropix.loading import load_model

    s = entropix_sampler(cfg, seed=5)
    _, tokens = _run(loaded, n=20, sampler=s)
    s.sampler.history = s.history[:len(tokens)]  # the emitted steps
    lm = load_model(str(tiny_hf), device="cpu", dtype="float32", progress=False)
    ids = loaded[1].encode(PROMPT)
    req = Request(prompt=list(ids), policy=Entropix(cfg, -1, attention=False), max_tokens=len(s.history), seed=5,
                  stop_ids=lm.tokenizer.stop_ids)
    ours = list(generate(lm.engine(), [req]))
    assert [r.token for r in ours] == [t for t, _ in s.history]
    assert [r.state for r in ours] == [st for _, st in s.history]
    assert len({st for _, st in s.history}) >= 2

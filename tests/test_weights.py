"""Loaders: GGUF files of several tensor types, HF folders (sharded too), bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from entropix import EntropixError
from entropix.weights import load_model, read_gguf

from tiny import write_gguf_from_hf, write_hf_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    # plain RoPE: GGUF files carry Llama-3 scaling as a tensor we do not write here
    return write_hf_model(tmp_path_factory.mktemp("hf") / "tiny", gguf_path, rope_scaling=None, seed=3)


def logits(lm, ids):
    cache = lm.model.new_cache(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        return lm.model(ids, cache, last_only=False)[0]


IDS = torch.randint(3, 40000, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("qtype, tol", [("F32", 1e-5), ("F16", 2e-2), ("Q8_0", 6e-2)])
def test_gguf_matches_hf_folder(tmp_path, tiny_hf, gguf_path, qtype, tol):
    """Same weights through both loaders; Q/K un-permutation must be right for this to hold."""
    path = write_gguf_from_hf(tiny_hf, tmp_path / f"tiny-{qtype}.gguf", gguf_path, qtype)
    a = load_model(str(path), device="cpu", dtype="float32", progress=False)
    b = load_model(str(tiny_hf), device="cpu", dtype="float32", progress=False)
    assert a.config.num_hidden_layers == 2 and not a.config.tie_word_embeddings
    diff = (logits(a, IDS) - logits(b, IDS)).abs().max().item()
    assert diff < tol, diff


def test_q8_gguf_matches_transformers_gguf_loader(tmp_path, tiny_hf, gguf_path):
    from transformers import AutoModelForCausalLM

    path = write_gguf_from_hf(tiny_hf, tmp_path / "tiny-q8.gguf", gguf_path, "Q8_0")
    ours = load_model(str(path), device="cpu", dtype="float32", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = ref(IDS).logits
    assert (logits(ours, IDS) - expected).abs().max().item() < 1e-4


def test_sharded_safetensors_with_index(tmp_path, tiny_hf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_hf / f, out / f)
    assert (out / "model.safetensors.index.json").is_file()
    a = load_model(str(out), device="cpu", dtype="float32", progress=False)
    b = load_model(str(tiny_hf), device="cpu", dtype="float32", progress=False)
    assert torch.equal(logits(a, IDS), logits(b, IDS))


def test_bf16_is_available(tiny_hf):
    lm = load_model(str(tiny_hf), device="cpu", dtype="bfloat16", progress=False)
    assert lm.model.dtype == torch.bfloat16
    f32 = load_model(str(tiny_hf), device="cpu", dtype="float32", progress=False)
    diff = (logits(lm, IDS).float() - logits(f32, IDS)).abs().max().item()
    assert diff < 0.5


def test_read_gguf_metadata(gguf_path):
    meta, tensors, _ = read_gguf(gguf_path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert tensors["token_embd.weight"].shape == (576, 49152)


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(EntropixError, match="truncated"):
        load_model(str(bad), progress=False)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    with pytest.raises(EntropixError, match="not a GGUF"):
        load_model(str(bad), progress=False)


def test_non_llama_architecture(tmp_path, tiny_hf):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EntropixError, match="unsupported architecture"):
        load_model(str(folder), progress=False)


def test_missing_path():
    with pytest.raises(EntropixError, match="no such model"):
        load_model("/nonexistent/model.gguf", progress=False)


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(EntropixError, match="local cache"):
        load_model("HuggingFaceTB/SmolLM2-360M-Instruct", progress=False)


def test_gguf_name_survives_renaming(tmp_path, gguf_path):
    """Profiles are chosen by model name: a renamed embedded GGUF still reads as smollm2-135m."""
    renamed = tmp_path / "model.gguf"
    renamed.symlink_to(gguf_path)
    assert load_model(str(renamed), progress=False).name == "smollm2-135m"

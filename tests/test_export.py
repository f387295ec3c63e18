"""`entropix export`: a model written as a Hugging Face folder, checked by loading it back (ours
and transformers'), tensor by tensor, config field by field, and the command's refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from entropix import EntropixError
from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.io.checkpoint import open_path
from entropix.io.export import convert, export, parse_size
from entropix.io.hf_meta import llama3_from_factors, target_config
from entropix.loading import load_model
from entropix.sampler.policy import Greedy

from tiny import write_family_gguf, write_family_model, write_gguf_from_hf, write_hf_model

TEXTS = ["Hello, world!", "Café déjà vu, naïve façade", "Emoji: 🦜🚀 and 👩‍👩‍👧", "1234567890 + 3.14159 = ?",
         "  leading spaces\nand\ttabs  "]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}]


def _header(path: Path) -> dict:
    raw = path.read_bytes()[:8]
    with open(path, "rb") as f:
        f.seek(8)
        return json.loads(f.read(struct.unpack("<Q", raw)[0]))


def _same_tensors(a: Path, b: Path, exact: bool = True) -> None:
    """Both checkpoints hold the same config and tensors (b's, where exact, bit for bit)."""
    ca, cb = open_path(a), open_path(b)
    assert ca.config == cb.config
    assert sorted(ca.names()) == sorted(cb.names())
    for name in ca.names():
        ta, tb = ca.read(name), cb.read(name)
        assert ta.array.shape == tb.array.shape, name
        if exact:
            assert ta.dtype == tb.dtype and np.array_equal(ta.array, tb.array), name
        else:
            np.testing.assert_allclose(convert(ta, "float32"), convert(tb, "float32"), rtol=1e-2, atol=1e-2)


def _greedy(lm, ids: list[int], n: int) -> list[int]:
    req = Request(prompt=ids, policy=Greedy(), max_tokens=n, stop_ids=frozenset())
    return [r.token for r in generate(lm.engine(), [req])]


def _logits(lm, ids: list[int]) -> torch.Tensor:
    t = torch.tensor([ids])
    cache = lm.model.new_cache(1, t.shape[1])
    with torch.inference_mode():
        return lm.model(t, cache, last_only=False)[0]


def _hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


# -- the embedded model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The embedded GGUF exported once in float32 (the command's default for quantized blocks)."""
    out = tmp_path_factory.mktemp("export") / "smollm2-hf"
    assert main(["export", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def back(exported):
    return load_model(str(exported), device="cpu", quant="none", dtype="float32", progress=False)


@pytest.mark.slow
def test_embedded_export_is_a_float32_folder(exported, capsys):
    header = _header(exported / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    assert "lm_head.weight" not in header and "model.layers.0.self_attn.q_proj.weight" in header
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert json.loads((exported / "generation_config.json").read_text())["bos_token_id"] == cfg["bos_token_id"]


@pytest.mark.slow
def test_embedded_export_gives_our_logits_and_tokens(smol, back):
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    assert back.config == smol.config
    assert (_logits(back, ids) - _logits(smol, ids)).abs().max().item() < 1e-5
    ours = _greedy(smol, ids, 24)
    assert len(ours) == 24 and _greedy(back, ids, 24) == ours


@pytest.mark.slow
def test_transformers_reads_the_export_as_we_do(smol, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        assert tok.encode(text) == smol.tokenizer.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = smol.tokenizer.encode_chat(CHAT)
    assert list(chat) == ids
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert model.dtype == torch.float32
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
    assert out[0, len(ids):].tolist() == _greedy(smol, ids, 16)


# -- tiny folders of each family -----------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "qwen2_window", "qwen3", "mistral", "deepseek_v2"])
def test_family_folder_round_trips(tmp_path, family):
    src = write_family_model(tmp_path / family, family)
    out = export(open_path(src), tmp_path / "out").folder
    _same_tensors(src, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
    ids = [5, 17, 42, 99, 7, 3, 250, 12, 64, 31]  # longer than mistral's window (8)
    assert torch.allclose(_hf_logits(out, ids), _hf_logits(src, ids), atol=1e-5)


@pytest.mark.slow  # a 49k-vocabulary folder
def test_llama_folder_round_trips_in_bfloat16_and_shards(tmp_path, gguf_path):
    src = write_hf_model(tmp_path / "tiny", gguf_path, seed=2)  # Llama-3 RoPE scaling, untied
    out = export(open_path(src), tmp_path / "f32", shard_bytes=parse_size("8MB")).folder
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    _same_tensors(src, out)
    ids = [1, 504, 3458, 282, 253, 2213, 30]
    assert torch.allclose(_hf_logits(out, ids), _hf_logits(src, ids), atol=1e-5)

    bf = export(open_path(src), tmp_path / "bf16", dtype="bf16").folder
    header = _header(bf / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    ours, theirs = open_path(bf), open_path(src)
    assert ours.native_dtype == "bfloat16" and ours.config == theirs.config
    for name in theirs.names():  # rounded as torch rounds to bfloat16
        want = torch.from_numpy(theirs.read(name).array).to(torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(ours.read(name).array.view(np.int16), want), name


@pytest.mark.slow  # a 49k-vocabulary GGUF
def test_gguf_export_undoes_llama_cpp_permutation(tmp_path, gguf_path):
    src = write_hf_model(tmp_path / "tiny", gguf_path, rope_scaling=None, seed=4)
    gguf_file = write_gguf_from_hf(src, tmp_path / "tiny.gguf", gguf_path)
    out = export(open_path(gguf_file), tmp_path / "out").folder
    a, b = open_path(src), open_path(out)
    for name in a.names():
        np.testing.assert_array_equal(a.read(name).array, b.read(name).array)
    ids = [1, 504, 3458, 282, 253]
    assert torch.allclose(_hf_logits(out, ids), _hf_logits(src, ids), atol=1e-5)


def test_deepseek_gguf_exports_per_expert_matrices(tmp_path):
    src = write_family_model(tmp_path / "ds", "deepseek_v2")
    gguf_file = write_family_gguf(src, tmp_path / "ds.gguf", split_kv_b=True)
    out = export(open_path(gguf_file), tmp_path / "out").folder
    header = _header(out / "model.safetensors")
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in header
    assert not any("experts.gate_up_proj" in k for k in header)
    a, b = open_path(src), open_path(out)
    assert b.config == target_config(open_path(gguf_file))  # GGUF's float32 eps and mscales, as the file says
    assert b.config.n_routed_experts == a.config.n_routed_experts and b.config.kv_lora_rank == a.config.kv_lora_rank
    for name in a.names():
        np.testing.assert_allclose(a.read(name).array, b.read(name).array, rtol=1e-6, atol=1e-7)


def test_llama3_scaling_is_recovered_from_gguf_divisors():
    from entropix.backends.torch.model import rope_inv_freq
    from entropix.config import ModelConfig

    plain = ModelConfig(vocab_size=10, hidden_size=4096, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
    llama3 = plain.replace(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                           rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)
    divisors = (rope_inv_freq(plain).double() / rope_inv_freq(llama3).double()).numpy()
    got = llama3_from_factors(plain, divisors)
    assert got["rope_original_max_position_embeddings"] == 8192 and got["rope_factor"] == pytest.approx(8.0)
    assert got["rope_high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    assert llama3_from_factors(plain, np.ones(64)) == {}
    with pytest.raises(EntropixError):
        llama3_from_factors(plain, np.linspace(1, 3, 64)[::-1].copy())


# -- refusals --------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    return write_family_model(tmp_path / "small", "qwen2")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("entropix: error: "), err
    return err[0]


def test_refuses_a_non_empty_folder_without_force(tmp_path, small, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(small), "--out", str(out)]) == 2
    assert "not empty" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left beside it
    assert main(["export", str(small), "--out", str(out), "--force"]) == 0
    assert "wrote" in capsys.readouterr().out and not (out / "keep.txt").exists()
    _same_tensors(small, out)


def test_bad_dtype_and_missing_model_are_one_line_errors(tmp_path, small, capsys):
    assert main(["export", str(small), "--out", str(tmp_path / "a"), "--dtype", "int8"]) == 2
    assert "int8" in _one_line_error(capsys)
    assert main(["export", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "b")]) == 2
    assert "nothing-here" in _one_line_error(capsys)
    assert main(["export", str(small), "--out", str(tmp_path / "c"), "--max-shard-size", "lots"]) == 2
    assert "lots" in _one_line_error(capsys)
    assert not any(p.name.startswith((".a", ".b", ".c", "a", "b", "c")) for p in tmp_path.iterdir())


def test_a_failed_export_leaves_nothing(tmp_path, small, monkeypatch):
    from entropix.io import export as ex

    def broken(*a, **k):
        raise EntropixError("disk on fire")

    monkeypatch.setattr(ex, "write_weights", broken)
    with pytest.raises(EntropixError, match="disk on fire"):
        export(open_path(small), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["small"]

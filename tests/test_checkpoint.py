"""Checkpoints and the torch loader: GGUF files of several tensor types, HF folders (sharded,
bf16, .bin), lazy reads, slices, and bad files that must fail with one clear line."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch

from entropix import EntropixError
from entropix.io import checkpoint as ckpt_module
from entropix.io.gguf import read_gguf
from entropix.io.source import open_checkpoint
from entropix.loading import load_model

import tiny
from tiny import write_gguf_from_hf, write_hf_model, write_safetensors_copy


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    # plain RoPE: GGUF files carry Llama-3 scaling as a tensor we do not write here
    return write_hf_model(tmp_path_factory.mktemp("hf") / "tiny", gguf_path, rope_scaling=None, seed=3)


@pytest.fixture(scope="module")
def gguf_of(tmp_path_factory, tiny_hf, gguf_path):
    """tiny_hf as a GGUF file of a tensor type, written once for the module (a file takes ~1 s to write:
    the embedded tokenizer's 49k tokens and merges)."""
    folder, files = tmp_path_factory.mktemp("gguf"), {}

    def write(qtype: str):
        if qtype not in files:
            files[qtype] = write_gguf_from_hf(tiny_hf, folder / f"tiny-{qtype}.gguf", gguf_path, qtype)
        return files[qtype]

    return write


@pytest.fixture(scope="module")
def tiny_gguf(gguf_of):
    return gguf_of("F32")


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, tiny_hf):
    return write_safetensors_copy(tiny_hf, tmp_path_factory.mktemp("bf16") / "tiny-bf16", torch.bfloat16, shards=2)


def logits(lm, ids):
    cache = lm.model.new_cache(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        return lm.model(ids, cache, last_only=False)[0]


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


IDS = torch.randint(3, 40000, (1, 40), generator=torch.Generator().manual_seed(0))


# -- GGUF against HF, and against transformers -----------------------------------------------

SLOW = pytest.mark.slow  # each case writes and reads a 49k-vocabulary GGUF file (~2 s): one per test stays quick

@pytest.mark.parametrize("qtype, tol", [("F32", 1e-5), pytest.param("F16", 2e-2, marks=SLOW),
                                        pytest.param("Q8_0", 6e-2, marks=SLOW)])
def test_gguf_matches_hf_folder(tiny_hf, gguf_of, qtype, tol):
    """Same weights through both checkpoints; Q/K un-permutation must be right for this to hold."""
    path = gguf_of(qtype)
    a = load_model(str(path), device="cpu", dtype="float32", progress=False, quant="none")  # the file dequantized
    b = load_model(str(tiny_hf), device="cpu", dtype="float32", progress=False)
    assert a.config.num_hidden_layers == 2 and not a.config.tie_word_embeddings
    diff = (logits(a, IDS) - logits(b, IDS)).abs().max().item()
    assert diff < tol, diff


@pytest.mark.slow  # transformers' GGUF loader reads the whole vocabulary slowly (~3 s)
def test_q8_gguf_matches_transformers_gguf_loader(gguf_of):
    from transformers import AutoModelForCausalLM

    path = gguf_of("Q8_0")
    ours = load_model(str(path), device="cpu", dtype="float32", progress=False, quant="none")
    with tiny.gguf_read_once():
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = ref(IDS).logits
    assert (logits(ours, IDS) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype, kind", [pytest.param("F32", "dense", marks=SLOW), pytest.param("F16", "dense", marks=SLOW),
                                         pytest.param("Q4_0", "int4", marks=SLOW), ("Q4_1", "int4"),
                                         pytest.param("Q5_0", "dense", marks=SLOW), pytest.param("Q8_0", "int8", marks=SLOW)])
def test_the_default_keeps_each_gguf_type_as_stored(gguf_of, qtype, kind):
    """No --quant: 4-bit blocks on the int4 kernel, Q8_0 as int8 rows, anything else dense; the
    logits stay those of the same file dequantized to fp32 (4-bit blocks are int4 groups exactly:
    only the kernel's bf16 activations differ)."""
    from entropix.backends.torch.quant import weight_kinds

    path = gguf_of(qtype)
    auto = load_model(str(path), device="cpu", progress=False)
    dense = load_model(str(path), device="cpu", progress=False, quant="none")
    kinds = weight_kinds(auto.model)
    # 2 layers x (qkv, o, gate_up, down), and the output projection (dense: in oneDNN's packed layout)
    assert kinds[kind] == (8 if kind == "dense" else 9) == sum(kinds.values())
    a, b = logits(auto, IDS), logits(dense, IDS)
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err == 0 if kind == "dense" else err < {"int4": 0.02, "int8": 0.03}[kind], err
    assert set(a[0, -1].topk(5).indices.tolist()) == set(b[0, -1].topk(5).indices.tolist())


@pytest.mark.slow  # writes and reads 49k-vocabulary checkpoints (~1 s)
def test_gguf_names_and_dtypes(tiny_hf, tiny_gguf, gguf_of):
    g, h = open_checkpoint(str(tiny_gguf)), open_checkpoint(str(tiny_hf))
    assert sorted(g.names()) == sorted(h.names())
    assert g.native_dtype == "float32" and g.read("layers.0.self_attn.q_proj.weight").dtype == "float32"
    assert g.rope_freq_factors is None and g.config.arch == h.config.arch == "llama"
    f16 = open_checkpoint(str(gguf_of("F16")))
    assert f16.native_dtype == "float16"  # every matrix F16 (norms stay F32), read as stored
    assert f16.read("layers.0.mlp.up_proj.weight").array.dtype == np.float16
    assert f16.read("norm.weight").dtype == "float32"
    lm = load_model(str(f16.source), device="cpu", progress=False)
    assert lm.dtype == "float32"  # F16 matmuls are slow on CPUs: "auto" widens them there


def test_read_gguf_metadata(gguf_path):
    meta, tensors, _ = read_gguf(gguf_path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert tensors["token_embd.weight"].shape == (576, 49152)


# -- HF folders ---------------------------------------------------------------------------

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
    assert a.name == "sharded" and a.source == str(out)
    assert torch.equal(logits(a, IDS), logits(b, IDS))


@pytest.mark.slow  # writes and reads 49k-vocabulary checkpoints (~1 s)
def test_bf16_is_available(tiny_hf):
    lm = load_model(str(tiny_hf), device="cpu", dtype="bfloat16", progress=False)
    assert lm.model.dtype == torch.bfloat16 and lm.dtype == "bfloat16" and lm.device == "cpu"
    f32 = load_model(str(tiny_hf), device="cpu", dtype="float32", progress=False)
    diff = (logits(lm, IDS).float() - logits(f32, IDS)).abs().max().item()
    assert diff < 0.5


@pytest.mark.slow  # writes and reads 49k-vocabulary checkpoints (~1 s)
def test_bf16_folder_loads_lazily_and_keeps_bf16(tiny_bf16, monkeypatch):
    """Opening reads headers only; loading reads each tensor once, on its own."""
    reads: list[int] = []
    real = ckpt_module._read_bytes
    monkeypatch.setattr(ckpt_module, "_read_bytes", lambda path, off, n: reads.append(n) or real(path, off, n))
    ckpt = open_checkpoint(str(tiny_bf16))
    assert reads == [] and ckpt.native_dtype == "bfloat16"
    lm = load_model(str(tiny_bf16), device="cpu", dtype="auto", progress=False)
    assert sorted(reads) == sorted(math.prod(ckpt.shape(n)) * 2 for n in ckpt.names())
    assert lm.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    f32 = load_model(str(tiny_bf16), device="cpu", dtype="float32", progress=False)
    assert all(p.dtype == torch.float32 for p in f32.model.parameters())
    assert torch.equal(f32.model.embed_tokens.weight, lm.model.embed_tokens.weight.float())
    diff = (logits(lm, IDS).float() - logits(f32, IDS)).abs().max().item()
    assert diff < 0.5


def test_missing_lm_head_means_tied(tmp_path, tiny_hf):
    folder = write_safetensors_copy(tiny_hf, tmp_path / "tied", drop=("lm_head.weight",))
    ckpt = open_checkpoint(str(folder))
    assert ckpt.config.tie_word_embeddings and "lm_head.weight" not in ckpt.names()
    lm = load_model(str(folder), device="cpu", progress=False)
    x = torch.randn(3, lm.config.hidden_size)
    with torch.inference_mode():  # the output projection is the embedding (packed or not)
        assert torch.allclose(lm.model.lm_head(x), x @ lm.model.embed_tokens.weight.T, atol=1e-5)


@pytest.mark.slow  # writes and reads 49k-vocabulary checkpoints (~1 s)
def test_pytorch_bin_folder(tmp_path, tiny_hf):
    """No safetensors: the torch loader reads pytorch_model.bin (weights_only, mmap)."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    for f in tiny_hf.glob("*.json"):
        shutil.copy(f, folder / f.name)
    torch.save(load_file(str(tiny_hf / "model.safetensors")), folder / "pytorch_model.bin")
    ckpt = open_checkpoint(str(folder))
    with pytest.raises(EntropixError, match="only the torch backend"):
        ckpt.read("norm.weight")
    a = load_model(str(folder), device="cpu", progress=False)
    b = load_model(str(tiny_hf), device="cpu", progress=False)
    assert a.dtype == "float32" and torch.equal(logits(a, IDS), logits(b, IDS))


def test_fuse_is_a_load_time_choice(tiny_hf):
    from entropix.backends.torch.loader import load

    ckpt = open_checkpoint(str(tiny_hf))
    fused, plain = load(ckpt, "cpu", progress=False), load(ckpt, "cpu", fuse=False, progress=False)
    assert fused.layers[0].self_attn.qkv_proj is not None and fused.layers[0].mlp.gate_up_proj is not None
    assert plain.layers[0].self_attn.qkv_proj is None and hasattr(plain.layers[0].self_attn, "q_proj")
    with torch.inference_mode():
        a = fused(IDS, fused.new_cache(1, IDS.shape[1]), last_only=False)[0]
        b = plain(IDS, plain.new_cache(1, IDS.shape[1]), last_only=False)[0]
    assert (a - b).abs().max().item() < 1e-5


# -- slices --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hf", "hf-bf16", "gguf"])
def test_read_slice_equals_slicing_read(request, kind):
    folder = {"hf": "tiny_hf", "hf-bf16": "tiny_bf16", "gguf": "tiny_gguf"}[kind]
    ckpt = open_checkpoint(str(request.getfixturevalue(folder)))
    for name in ("layers.1.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                 "layers.0.mlp.down_proj.weight", "norm.weight"):
        full = ckpt.read(name)
        for dim in range(full.array.ndim):
            n = full.array.shape[dim]
            part = ckpt.read_slice(name, dim, n // 4, n // 2 + 1)
            assert part.dtype == full.dtype
            np.testing.assert_array_equal(part.array, full.array.take(range(n // 4, n // 2 + 1), axis=dim))
    with pytest.raises(EntropixError, match="outside"):
        ckpt.read_slice("norm.weight", 0, 0, 10**6)
    with pytest.raises(EntropixError, match="dimension"):
        ckpt.read_slice("norm.weight", 1, 0, 1)


def test_read_slice_of_rows_reads_only_those_rows(tiny_bf16, monkeypatch):
    ckpt = open_checkpoint(str(tiny_bf16))
    reads: list[int] = []
    real = ckpt_module._read_bytes
    monkeypatch.setattr(ckpt_module, "_read_bytes", lambda path, off, n: reads.append(n) or real(path, off, n))
    rows, cols = ckpt.shape("embed_tokens.weight")
    part = ckpt.read_slice("embed_tokens.weight", 0, 100, 164)
    assert part.array.shape == (64, cols) and part.array.dtype == np.uint16
    assert reads == [64 * cols * 2]


# -- bad input -----------------------------------------------------------------------------

def _folder_with_weights(tmp_path, tiny_hf, data: bytes):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in tiny_hf.glob("*.json"):
        shutil.copy(f, folder / f.name)
    (folder / "model.safetensors").write_bytes(data)
    return folder


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("data, message", [
    (b"abc", "corrupt or truncated safetensors header"),
    (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated safetensors header"),
    (struct.pack("<Q", 8) + b"not json", "not JSON"),
    (_safetensors({"norm.weight": {"dtype": "F32", "shape": [64]}}), "corrupt safetensors header"),
    (_safetensors({"norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 100]}}, bytes(100)),
     "offsets"),
    (_safetensors({"norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, bytes(10)),
     "truncated"),
])
def test_corrupt_safetensors(tmp_path, tiny_hf, data, message):
    folder = _folder_with_weights(tmp_path, tiny_hf, data)
    with pytest.raises(EntropixError, match=message) as e:
        load_model(str(folder), device="cpu", progress=False)
    one_line_error(e)


@pytest.mark.slow  # writes and reads 49k-vocabulary checkpoints (~1 s)
def test_missing_tensor_unsupported_dtype_wrong_shape(tmp_path, tiny_hf):
    folder = write_safetensors_copy(tiny_hf, tmp_path / "partial", drop=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(EntropixError, match="lack layers.1.mlp.down_proj.weight") as e:
        load_model(str(folder), device="cpu", progress=False)
    one_line_error(e)
    f64 = write_safetensors_copy(tiny_hf, tmp_path / "f64", dtype=torch.float64)
    with pytest.raises(EntropixError, match="stored as F64") as e:
        load_model(str(f64), device="cpu", progress=False)
    one_line_error(e)
    wrong = write_safetensors_copy(tiny_hf, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(EntropixError, match="do not fit the model") as e:
        load_model(str(wrong), device="cpu", progress=False)
    one_line_error(e)


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
    cfg["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(str(folder)).config.arch == "mistral"


def test_missing_path():
    with pytest.raises(EntropixError, match="no such model"):
        load_model("/nonexistent/model.gguf", progress=False)


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(EntropixError, match="local cache"):
        load_model("HuggingFaceTB/SmolLM2-360M-Instruct", progress=False)


@pytest.mark.parametrize("kw, message", [({"backend": "tpu-magic"}, "unknown backend 'tpu-magic' \\(known: torch"),
                                         ({"dtype": "int8"}, "unknown dtype"),
                                         ({"device": "tpu9"}, "unknown device")])
def test_bad_load_options(tiny_hf, kw, message):
    with pytest.raises(EntropixError, match=message) as e:
        load_model(str(tiny_hf), progress=False, **kw)
    one_line_error(e)


@pytest.mark.slow  # writes and reads 49k-vocabulary checkpoints (~1 s)
def test_gguf_name_survives_renaming(tmp_path, gguf_path):
    """Profiles are chosen by model name: a renamed embedded GGUF still reads as smollm2-135m."""
    renamed = tmp_path / "model.gguf"
    renamed.symlink_to(gguf_path)
    assert open_checkpoint(str(renamed)).name == "smollm2-135m"
    assert open_checkpoint(None).name == open_checkpoint("default").name == "smollm2-135m"

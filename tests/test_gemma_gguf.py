"""Gemma 2 / Gemma 3 GGUF files in llama.cpp's layout (norms with the 1 added, tied output, a
SentencePiece vocabulary), written here from tiny transformers folders: our logits equal the
folder's, and through our engine greedy text and logits equal llama.cpp's own on the same file."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from entropix.cli import main
from entropix.loading import load_model

from tiny import write_gemma_gguf, write_gemma_model

FAMILIES = ["gemma2", "gemma3"]
PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have? The quick brown fox"
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (make install-llamacpp)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(folder, gguf) per family. llama.cpp scales queries by 1/sqrt(head_dim) (its files carry no
    query_pre_attn_scalar), so these folders use that scale."""
    root = tmp_path_factory.mktemp("gemma_gguf")
    out = {}
    for f in FAMILIES:
        folder = write_gemma_model(root / f, f, query_pre_attn_scalar=16)
        out[f] = folder, write_gemma_gguf(folder, root / f"{f}.gguf")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_logits_equal_the_folders(family, files):
    folder, path = files[family]
    g = load_model(str(path), device="cpu", dtype="float32", progress=False)
    h = load_model(str(folder), device="cpu", dtype="float32", progress=False)
    assert (g.config.sliding_window, g.config.sliding_layers) == (h.config.sliding_window, h.config.sliding_layers)
    assert g.config.tie_word_embeddings and g.config.norm_weight_offset == 0.0
    lens = [23, 14, 6]
    ids = torch.randint(10, g.config.vocab_size, (3, 23), generator=torch.Generator().manual_seed(4))
    out = []
    for lm in (g, h):
        cache = lm.model.new_cache(3, 23)
        cache.starts = [23 - n for n in lens]
        with torch.inference_mode():
            out.append(lm.model(ids, cache, last_only=False)[0])
    err = max((out[0][b, 23 - n:] - out[1][b, 23 - n:]).abs().max().item() for b, n in enumerate(lens))
    assert err < 1e-5, f"{family}: max |gguf - folder| = {err:.2e}"


def _llama(path):
    from llama_cpp import Llama

    # an fp32 KV cache (GGML_TYPE_F32 = 0): its default f16 one would round keys and values
    return Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, type_k=0, type_v=0, verbose=False)


@needs_llama
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tokens_and_logits_equal_llamacpp(family, files):
    """Our SentencePiece encoding is llama.cpp's, and so are the prompt's logits (fp32 both; within
    5e-3, not 1e-4: ggml's CPU GELU reads a table of fp16 values, measured 1.2e-3 to 1.9e-3 here)."""
    import numpy as np

    _, path = files[family]
    llm, lm = _llama(path), load_model(str(path), device="cpu", dtype="float32", progress=False)
    ids = lm.tokenizer.encode(PROMPT)
    assert ids == llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    with torch.inference_mode():
        ours, _ = lm.model(torch.tensor([ids]), lm.model.new_cache(1, len(ids)), last_only=False)
    err = (ours[0] - theirs).abs().max().item()
    assert err < 5e-3, f"{family}: max |ours - llama.cpp| = {err:.2e}"


@needs_llama
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_through_the_cli_equals_llamacpp(family, files, capsys):
    _, path = files[family]
    rc = main(["generate", PROMPT, "--model", str(path), "--raw", "--json", "--max-tokens", "32",
               "--device", "cpu", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    llm = _llama(path)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    theirs = []
    for tok in llm.generate(ids, temp=0.0):
        theirs.append(int(tok))
        if len(theirs) == 32:
            break
    assert res["usage"]["prompt_tokens"] == len(ids)
    assert res["tokens"] == theirs and len(theirs) == 32


@needs_llama
def test_a_q4_k_m_file_gives_transformers_greedy(tmp_path, capsys):
    """A Gemma 3 file in the 1B model's layout (head_dim and query_pre_attn_scalar 256, five local
    layers to a global one, no RoPE scaling: what transformers' GGUF reader assumes) quantized to
    Q4_K_M by llama.cpp's own quantizer (Q4_K and Q6_K blocks): under --quant none our greedy is
    transformers' on the same file, which dequantizes it, and so are the prompt's logits."""
    import gguf
    import llama_cpp
    from transformers import AutoModelForCausalLM

    folder = write_gemma_model(tmp_path / "g3", "gemma3", std=0.015, hidden_size=256, intermediate_size=512,
                               num_attention_heads=1, num_hidden_layers=7, head_dim=256, query_pre_attn_scalar=256,
                               sliding_window_pattern=6,
                               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    f32, path = write_gemma_gguf(folder, tmp_path / "f32.gguf"), tmp_path / "q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) == 0
    assert {"Q4_K", "Q6_K"} <= {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    rc = main(["generate", PROMPT, "--model", str(path), "--raw", "--json", "--max-tokens", "32", "--quant", "none"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    lm = load_model(str(path), quant="none", progress=False)
    ids = lm.tokenizer.encode(PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours, _ = lm.model(torch.tensor([ids]), lm.model.new_cache(1, len(ids)), last_only=False)
        assert (ours[0].float() - hf(torch.tensor([ids])).logits[0]).abs().max().item() < 1e-4
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = theirs[0, len(ids):].tolist()
    assert res["tokens"] == theirs and len(set(theirs)) > 3  # a text that moves, not one token repeated

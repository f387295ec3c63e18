"""The MLX backend on a tiny random Qwen2 (an architecture only mlx-lm's zoo gives us), written
by transformers: logits against transformers, then the CLI, server, CoT and eval on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from entropix.backends import create_backend
from entropix.cli import main
from entropix.loading import load_model

from tiny import save_gguf_tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, gguf_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than default init so that logits vary visibly; biases too
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.08)
    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwen2"
    model.save_pretrained(folder, safe_serialization=True)
    save_gguf_tokenizer(gguf_path, folder)
    return folder, model


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_model(str(qwen_dir[0]), backend="mlx", device="cpu", dtype="float32", progress=False)


def test_qwen2_ragged_batch_matches_transformers(qwen, qwen_dir):
    _, hf = qwen_dir
    assert qwen.config.arch == "qwen2" and qwen.backend == "mlx"
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 49152, n)) for n in (9, 3, 14)]
    b = create_backend(qwen)
    b.prefill(prompts, [1, 1, 1], capture=True)
    nxt = [int(x) for x in rng.integers(3, 49152, 3)]
    first = np.array(b.logits)
    b.advance(nxt, capture=True)
    second = np.array(b.logits)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p + [nxt[i]]])).logits[0].float().numpy()
            np.testing.assert_allclose(first[i], ref[-2], atol=1e-4, rtol=0)
            np.testing.assert_allclose(second[i], ref[-1], atol=1e-4, rtol=0)
    assert np.array(b.attn_valid).all() and np.isfinite(np.array(b.attn)).all()


@pytest.mark.slow  # the CLI / server end to end on mlx
def test_cli_generate_runs_on_mlx(qwen_dir, capsys):
    rc = main(["generate", "Hello", "--model", str(qwen_dir[0]), "--backend", "mlx", "--device", "cpu",
               "--raw", "--max-tokens", "6", "--sampler", "entropix", "--seed", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["usage"]["completion_tokens"] == 6
    assert all(r["state"] for r in out["records"])


@pytest.mark.slow  # the CLI / server end to end on mlx
def test_cli_cot_and_eval_run_on_mlx(qwen_dir, capsys):
    rc = main(["generate", "Tom has 3 apples", "--model", str(qwen_dir[0]), "--backend", "mlx", "--raw",
               "--max-tokens", "5", "--sampler", "cot", "--branches", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["branches"]) == 3
    rc = main(["eval", "--task", "arithmetic", "--sampler", "greedy", "--limit", "2", "--max-tokens", "4",
               "--model", str(qwen_dir[0]), "--backend", "mlx", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res


@pytest.mark.slow  # the CLI / server end to end on mlx
def test_server_runs_on_mlx(qwen):
    import httpx

    from entropix.serve import ServerThread, create_app

    with ServerThread(create_app(qwen, max_rows=8, max_n=4)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": qwen.name, "prompt": "Hi", "max_tokens": 4, "n": 2,
                                               "sampler": "entropix", "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 8


def test_unknown_architecture_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rc = main(["generate", "hi", "--model", str(tmp_path), "--backend", "mlx"])
    err = capsys.readouterr().err
    assert rc == 2 and "entropix: error:" in err and "gpt2" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, gguf_path):
    from tiny import write_hf_model

    return write_hf_model(tmp_path_factory.mktemp("llama") / "tiny-llama", gguf_path)  # Llama-3 RoPE scaling


def test_llama3_folder_through_mlx_lm_matches_the_torch_backend(llama_dir):
    t = load_model(str(llama_dir), backend="torch", device="cpu", dtype="float32", progress=False)
    m = load_model(str(llama_dir), backend="mlx", device="cpu", dtype="float32", progress=False)
    prompts = [[1, 5, 9, 200, 3000], [1, 7], [1] + list(range(100, 160))]  # past the 64-position original context
    bt, bm = create_backend(t), create_backend(m)
    for b in (bt, bm):
        b.prefill(prompts, [1, 1, 1], capture=True)
    np.testing.assert_allclose(np.array(bm.logits), bt.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(bm.attn), bt.attn.numpy(), atol=1e-4, rtol=1e-5)


@pytest.mark.slow  # a bench on both backends
def test_bench_reports_mlx_and_torch_side_by_side(llama_dir, capsys):
    rc = main(["bench", "--model", str(llama_dir), "--backend", "mlx", "--device", "cpu", "--dtype", "float32",
               "--json", "--tokens", "4", "--repeats", "1", "--sampler", "entropix"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["backend"] == "mlx"
    for k in ("mlx_tps", "torch_tps", "mlx_entropix_tps", "torch_entropix_tps"):
        assert out[k] > 0
    assert out["mlx_vs_torch"] == pytest.approx(out["mlx_tps"] / out["torch_tps"], rel=0.01)


@pytest.mark.slow  # the CLI / server end to end on mlx
def test_quantized_mlx_folder_runs(qwen_dir, qwen, tmp_path, capsys):
    """A 4-bit MLX folder as the mlx-community organisation publishes them (mlx_lm.convert, offline)."""
    from mlx_lm import convert

    out_dir = tmp_path / "tiny-qwen2-4bit"
    convert(str(qwen_dir[0]), mlx_path=str(out_dir), quantize=True, q_group_size=32, q_bits=4)
    capsys.readouterr()
    q4 = load_model(str(out_dir), backend="mlx", device="cpu", progress=False)
    assert "QuantizedLinear" in type(q4.model.model.layers[0].self_attn.q_proj).__name__
    prompts = [[5, 6, 7, 8], [9]]
    logits = []
    for m in (qwen, q4):
        b = create_backend(m)
        b.prefill(prompts, [1, 1], capture=True)
        logits.append(np.array(b.logits))
    for full, quant in zip(*logits):  # 4-bit weights: close to the fp32 model, not equal
        assert np.corrcoef(full, quant)[0, 1] > 0.9
    rc = main(["generate", "Hi", "--model", str(out_dir), "--backend", "mlx", "--raw", "--max-tokens", "4", "--json"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["tokens"]) == 4

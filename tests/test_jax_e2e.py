"""The JAX backend end to end: checkpoint files, the CLI, the server, CoT and eval on it (a
tiny checkpoint with the embedded tokenizer), and the embedded model against --backend torch
(slow)."""

from __future__ import annotations

import json

import httpx
import jax
import numpy as np
import pytest


from entropix.backends.base import SampleGroup
from entropix.backends.jax.backend import JaxBackend
from entropix.backends.torch.backend import TorchBackend
from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.loading import load_model
from entropix.sampler.policy import Greedy
from entropix.serve import ServerThread, create_app

from jax_parity import assert_close
from tiny import write_gguf_from_hf, write_hf_model

pytestmark = pytest.mark.slow  # end to end: the CLI, server and bench on jax (make test-fast leaves it out)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    return write_hf_model(tmp_path_factory.mktemp("jax") / "tiny", gguf_path, max_position_embeddings=512)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_cli_generate_and_cot_on_jax_equal_torch(tiny_hf, capsys, cli_load_once):
    """64 greedy tokens, then CoT's branches and answer. The greedy prompt is as long as CoT's
    (one prompt-length bucket: one prefill program for both)."""
    base = ["--model", str(tiny_hf), "--device", "cpu", "--dtype", "float32", "--json"]
    out = {b: json.loads(run_cli(capsys, "generate", "Write a long story about a cat who learns to sail.", "-n", "64",
                                 "--backend", b, *base)) for b in ("jax", "torch")}
    assert out["jax"]["tokens"] == out["torch"]["tokens"] and len(out["jax"]["tokens"]) >= 1
    cot = {b: json.loads(run_cli(capsys, "generate", "2 + 3 =", "--sampler", "cot", "--branches", "3", "-n", "6",
                                 "--backend", b, *base)) for b in ("jax", "torch")}
    assert len(cot["jax"]["branches"]) == 3
    assert [br["text"] for br in cot["jax"]["branches"]] == [br["text"] for br in cot["torch"]["branches"]]
    assert cot["jax"]["answer"] == cot["torch"]["answer"]


def test_cli_eval_on_jax(tiny_hf, capsys, tmp_path):
    res = tmp_path / "res.jsonl"
    out = run_cli(capsys, "eval", "--task", "arithmetic", "--limit", "3", "--max-tokens", "6", "--batch-size", "2",
                  "--backend", "jax", "--model", str(tiny_hf), "--device", "cpu", "--out", str(res), "--json",
                  "--quiet")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n"] == 3 and 0 <= summary["accuracy"] <= 1
    assert len(res.read_text().splitlines()) == 3


def test_server_on_jax(tiny_hf):
    lm = load_model(str(tiny_hf), backend="jax", device="cpu", dtype="float32", progress=False)
    with ServerThread(create_app(lm, max_rows=8)) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        r = http.post("/v1/chat/completions", json={"model": lm.name, "messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 5, "n": 2, "sampler": "entropix", "seed": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] >= 2
        assert all(c["entropix"] for c in body["choices"])
        h = http.get("/health").json()
        assert h["status"] == "ok"


def test_bench_reports_both_backends_and_their_ratio(tiny_hf, capsys):
    out = json.loads(run_cli(capsys, "bench", "--backend", "jax", "--model", str(tiny_hf), "--tokens", "6",
                             "--prompt-tokens", "8", "--repeats", "1", "--json"))
    assert out["backend"] == "jax" and out["jax_tps"] > 0 and out["torch_tps"] > 0
    assert out["jax_vs_torch"] == pytest.approx(out["jax_tps"] / out["torch_tps"], rel=0.02)
    assert isinstance(out["compilations_first_run"], int) and out["compilations_timed_runs"] == 0  # warm: no compiles


def test_hf_folder_and_gguf_load_like_torch(tiny_hf, tmp_path, gguf_path):
    """Llama-3 RoPE scaling from an HF folder (the module's checkpoint), and a GGUF file of
    it: the same logits as torch; the folder in bf16 decodes."""
    gguf = write_gguf_from_hf(tiny_hf, tmp_path / "tiny.gguf", gguf_path)
    prompt = [1, 200, 300, 400, 500]
    for spec in (tiny_hf, gguf):
        lt = load_model(str(spec), backend="torch", device="cpu", dtype="float32", progress=False)
        lj = load_model(str(spec), backend="jax", device="cpu", dtype="float32", progress=False)
        assert lj.backend == "jax" and lj.dtype == "float32" and lj.config == lt.config
        jb, tb = JaxBackend(lj.model), TorchBackend(lt.model)
        for b in (jb, tb):
            b.prefill([prompt, prompt[:2]], [1, 1], True)
            b.advance([7, 8], True)
        assert_close(jb, tb)
    bf = load_model(str(tiny_hf), backend="jax", device="cpu", dtype="bfloat16", progress=False)
    assert bf.dtype == "bfloat16" and bf.model.params["embed_tokens"].dtype == jax.numpy.bfloat16
    toks = [r.token for r in generate(bf.engine(), [Request(prompt=prompt, policy=Greedy(), max_tokens=4)])]
    assert len(toks) == 4


# -- the embedded model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_jax():
    return load_model(None, backend="jax", device="cpu", dtype="float32", progress=False)


def test_embedded_smoke_ragged_batch_fp32_equal_torch(smol, smol_jax):
    """The embedded model's one test here (each program of its 30 layers takes seconds to
    compile, so one prefill and one decode shape): a ragged batch with a copied row, fp32 logits
    and attention statistics within 1e-4 of torch's and the same greedy tokens, 4 steps. Longer
    runs: the tiny checkpoint (64 greedy tokens through the CLI above), the ragged batch on a tiny
    model and the entropix policy through the engine (tests/test_jax_backend.py)."""
    jb, tb = JaxBackend(smol_jax.model), TorchBackend(smol.model)
    tok = smol.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("1, 2, 3,"),
               tok.encode("Entropy measures how uncertain a language model is about its next token, and so")]
    worst = 0.0
    for b in (jb, tb):
        b.prefill(prompts, [1, 2, 1], True)
    for step in range(4):
        worst = max(worst, float(np.abs(np.asarray(jb.state[1])[:jb.rows] - tb.logits.numpy()).max()))
        np.testing.assert_allclose(np.asarray(jb.state[2])[:jb.rows], tb.attn.numpy(), atol=1e-4, rtol=0)
        greedy = [SampleGroup(Greedy(), tuple(range(tb.rows)))]
        nxt = tb.sample(greedy, 1).token.tolist()
        assert jb.sample(greedy, 1).token.tolist() == nxt, step
        for b in (jb, tb):
            b.advance(nxt, True)
    assert worst <= 1e-4, worst

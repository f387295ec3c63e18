"""The JAX backend end to end: the CLI, the server, CoT and eval on it (a tiny checkpoint
with the embedded tokenizer), and the embedded model against --backend torch (slow)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest


from entropix.backends.jax.backend import JaxBackend
from entropix.backends.torch.backend import TorchBackend
from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.loading import load_model
from entropix.sampler import catalog
from entropix.serve import ServerThread, create_app

from tiny import write_hf_model

pytestmark = pytest.mark.slow  # end to end: the CLI, server and bench on jax (make test-fast leaves it out)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    return write_hf_model(tmp_path_factory.mktemp("jax") / "tiny", gguf_path, max_position_embeddings=512)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_cli_generate_and_cot_on_jax_equal_torch(tiny_hf, capsys):
    base = ["--model", str(tiny_hf), "--device", "cpu", "--dtype", "float32", "--json"]
    out = {b: json.loads(run_cli(capsys, "generate", "Hello there", "-n", "64", "--backend", b, *base))
           for b in ("jax", "torch")}
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


# -- the embedded model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_jax():
    return load_model(None, backend="jax", device="cpu", dtype="float32", progress=False)


def test_embedded_greedy_equal_torch(cli_load_once, capsys):
    """A smoke test of 16 tokens (64 on the tiny checkpoint: test_cli_generate_and_cot_on_jax_equal_torch)."""
    args = ["generate", "Write a long story about a cat who learns to sail.", "-n", "16", "--device", "cpu",
            "--dtype", "float32", "--json", "--top-logprobs", "1"]
    jax_out = json.loads(run_cli(capsys, *args, "--backend", "jax"))
    torch_out = json.loads(run_cli(capsys, *args, "--backend", "torch", "--quant", "none"))  # fp32, as jax computes
    assert len(jax_out["tokens"]) == 16
    assert jax_out["tokens"] == torch_out["tokens"]


def test_embedded_ragged_batch_fp32_logits_within_1e4(smol, smol_jax):
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
        nxt = tb.logits.argmax(-1).tolist()
        for b in (jb, tb):
            b.advance(nxt, True)
    assert worst <= 1e-4, worst


def test_embedded_entropix_same_states_and_tokens(smol, smol_jax):
    """The engine draws the uniforms on the host (seeded per row) and injects them."""
    dec = catalog.resolve("entropix", smol)
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": "How many r's are in strawberry?"}])
    out = []
    for m in (smol, smol_jax):
        req = Request(prompt=ids, policy=dec.policy, max_tokens=12, seed=11, stop_ids=smol.tokenizer.stop_ids)
        out.append([(r.token, r.state) for r in generate(m.engine(dec.capture_layers), [req])])
    assert out[0] == out[1]
    assert len({s for _, s in out[0]}) >= 2  # more than one strategy fired

"""The MLX backend on the embedded SmolLM2-135M GGUF against the PyTorch backend (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from entropix.backends import create_backend
from entropix.cli import main
from entropix.decode.records import Request
from entropix.loading import load_model
from entropix.sampler import catalog

pytestmark = pytest.mark.slow
POEM = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def smol_mlx():
    return load_model(None, backend="mlx", device="cpu", dtype="float32", progress=False)


def test_cli_greedy_same_as_torch(cli_load_once, capsys):
    """A smoke test of 8 tokens (64 on the tiny model: tests/test_mlx_backend.py)."""
    outs = []
    for backend in ("torch", "mlx"):
        rc = main(["generate", POEM, "--backend", backend, "--device", "cpu", "--max-tokens", "8", "--json"])
        outs.append(json.loads(capsys.readouterr().out))
        assert rc == 0
    assert len(outs[0]["tokens"]) == 8
    assert outs[1]["tokens"] == outs[0]["tokens"]


def _alone(smol, seq, step):
    """A fresh backend that ran one row: its text but the last `step` tokens as a prefill, then those."""
    b = create_backend(smol)
    b.prefill([seq[:len(seq) - step]], [1], capture=True)
    for t in seq[len(seq) - step:]:
        b.advance([t], capture=True)
    return b


def test_fp32_logits_over_a_ragged_batch_match_torch(smol, smol_mlx):
    """Each row of an MLX fp32 ragged batch (padding, a shared prefill, a fork) against the same
    row alone: in MLX fp32 (the batch changes nothing), in MLX fp64 (the exact value, within
    1e-4) and in PyTorch fp32. PyTorch's own padded rows differ from its unpadded ones by up to
    8e-5 on this model and each fp32 run is up to ~7e-5 from the fp64 value, so the two
    backends' mutual difference is held to 2e-4."""
    from entropix.backends.mlx.loader import load_checkpoint
    from entropix.io.source import open_checkpoint
    import dataclasses

    import mlx.core as mx

    exact = dataclasses.replace(smol_mlx, model=load_checkpoint(open_checkpoint(None), mx.float64)[0])
    prompts = [smol.tokenizer.encode(t) for t in ("Hi", "The quick brown fox jumps over the lazy dog because",
                                                "Entropy is")]
    bm = create_backend(smol_mlx)
    bm.prefill(prompts, [1, 2, 1], capture=True)
    history = [list(prompts[i]) for i in (0, 1, 1, 2)]
    rng = np.random.default_rng(0)
    worst = {"fp64": 0.0, "torch": 0.0}
    for step in range(2):  # a step of the prefill's rows, then one after a fork and a reorder
        if step == 1:
            bm.select([3, 1, 1, 0])
            history = [list(history[i]) for i in (3, 1, 1, 0)]
        for i, seq in enumerate(history):
            got = np.array(bm.logits[i])
            np.testing.assert_allclose(got, np.array(_alone(smol_mlx, seq, step).logits[0]), atol=1e-5, rtol=0)
            worst["fp64"] = max(worst["fp64"], float(np.abs(got - np.array(_alone(exact, seq, step).logits[0])).max()))
            ref = _alone(smol, seq, step)
            worst["torch"] = max(worst["torch"], float(np.abs(got - ref.logits[0].numpy()).max()))
            np.testing.assert_allclose(np.array(bm.attn[i]), ref.attn[0].numpy(), atol=1e-4, rtol=1e-5)
        toks = [int(x) for x in rng.integers(0, smol.config.vocab_size, bm.rows)]
        bm.advance(toks, capture=True)
        history = [h + [t] for h, t in zip(history, toks)]
    print("max |logit difference|:", worst)
    assert worst["fp64"] < 1e-4 and worst["torch"] < 2e-4, worst


def test_entropix_same_decisions_with_the_same_draws(smol, smol_mlx):
    dec = catalog.resolve("entropix", smol)  # the embedded model's built-in profile
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a dragon."}])
    recs = []
    for m in (smol, smol_mlx):
        eng = m.engine(dec.capture_layers)
        eng.add([Request(prompt=ids, policy=dec.policy, max_tokens=8, seed=11, n=2)])  # two rows, one prefill
        out = []
        while eng.active:
            out.extend(eng.step())
        recs.append(out)
    assert [(r.choice, r.index, r.token, r.state) for r in recs[0]] == \
        [(r.choice, r.index, r.token, r.state) for r in recs[1]]
    assert len({r.state for r in recs[0]}) >= 3

"""The MLX backend on the embedded SmolLM2-135M GGUF against the PyTorch backend (slow), and the
ragged-batch precision check on a tiny random model.

MLX on the CPU costs ~0.16 s per prompt token of the embedded model, so its checks here are smoke
tests over short prompts and a few tokens; tests/test_mlx_backend.py carries the long ones on a
tiny model.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from entropix.backends import create_backend
from entropix.cli import main
from entropix.decode.records import Request
from entropix.loading import load_model
from entropix.sampler import catalog

PROMPT = "The sea is"  # a plain completion: three prompt tokens, each ~0.16 s in MLX on the CPU


@pytest.fixture(scope="module")
def smol_mlx():
    return load_model(None, backend="mlx", device="cpu", dtype="float32", progress=False)


@pytest.fixture
def mlx_cli_once(cli_load_once, smol_mlx, monkeypatch):
    """The CLI's `--backend mlx` load of the default model on the CPU under the default dtype
    (fp32 there) gets smol_mlx, the model those flags load, instead of loading it again."""
    import mlx.core as mx

    import entropix.cli.generate as command
    from entropix.backends.mlx.loader import resolve_dtype

    load = command.load

    def once(args, quiet=False):
        if args.backend == "mlx" and args.model in (None, "default") and args.device == "cpu" \
                and resolve_dtype(args.dtype, mx.cpu, "float32") == mx.float32:
            return smol_mlx
        return load(args, quiet)

    monkeypatch.setattr(command, "load", once)


@pytest.mark.slow
def test_cli_greedy_same_as_torch(mlx_cli_once, capsys):
    """A smoke test of 8 tokens after a short prompt (64 on the tiny model: tests/test_mlx_backend.py).
    MLX's default is fp32 over the dequantized blocks, so torch runs the same (--quant none): torch's
    own default multiplies the Q8_0 blocks on the int8 kernel in bf16, where this prompt's 6th token
    is a tie (',' and ' and' within 1e-3 on an AVX-512 CPU)."""
    outs = []
    for backend, quant in (("torch", "none"), ("mlx", "auto")):
        rc = main(["generate", PROMPT, "--raw", "--backend", backend, "--device", "cpu", "--quant", quant,
                   "--max-tokens", "8", "--json"])
        outs.append(json.loads(capsys.readouterr().out))
        assert rc == 0
    assert len(outs[0]["tokens"]) == 8
    assert outs[1]["tokens"] == outs[0]["tokens"]


def _alone(lm, seq, step, memo: dict):
    """Logits and attention of a fresh backend that ran one row: its text but the last `step`
    tokens as a prefill, then those. Memoised: a row and its copies run once, and a row one token
    past a row already run continues that row's backend with one advance (the same calls)."""
    key = (id(lm), tuple(seq), step)
    if key not in memo:
        b = memo.pop(("open", id(lm), tuple(seq[:-1]), step - 1), None) if step else None
        if b is None:
            b = create_backend(lm)
            b.prefill([seq[:len(seq) - step]], [1], capture=True)
            for t in seq[len(seq) - step:]:
                b.advance([t], capture=True)
        else:
            b.advance([seq[-1]], capture=True)
        memo[key] = tuple(np.array(x.numpy() if lm.backend == "torch" else x) for x in (b.logits[0], b.attn[0]))
        memo[("open", *key)] = b
    return memo[key]


def _ragged(mlx_lm, torch_lm, exact, prompts) -> dict:
    """Each row of an MLX ragged batch (padding, a shared prefill, a fork) against the same row
    alone: in MLX (the batch changes nothing), in PyTorch and, given `exact`, in MLX fp64. The
    worst logit difference from the last two."""
    bm = create_backend(mlx_lm)
    bm.prefill(prompts, [1, 2, 1], capture=True)
    history = [list(prompts[i]) for i in (0, 1, 1, 2)]
    rng, memo = np.random.default_rng(0), {}
    worst = {"fp64": 0.0, "torch": 0.0}
    for step in range(2):  # a step of the prefill's rows, then one after a fork and a reorder
        if step == 1:
            toks = [int(x) for x in rng.integers(0, mlx_lm.config.vocab_size, bm.rows)]
            bm.advance(toks, capture=True)
            history = [h + [t] for h, t in zip(history, toks)]
            bm.select([3, 1, 1, 0])
            history = [list(history[i]) for i in (3, 1, 1, 0)]
        for i, seq in enumerate(history):
            got = np.array(bm.logits[i])
            np.testing.assert_allclose(got, _alone(mlx_lm, seq, step, memo)[0], atol=1e-5, rtol=0)
            if exact is not None:
                worst["fp64"] = max(worst["fp64"], float(np.abs(got - _alone(exact, seq, step, memo)[0]).max()))
            ref_logits, ref_attn = _alone(torch_lm, seq, step, memo)
            worst["torch"] = max(worst["torch"], float(np.abs(got - ref_logits).max()))
            np.testing.assert_allclose(np.array(bm.attn[i]), ref_attn, atol=1e-4, rtol=1e-5)
    print("max |logit difference|:", worst)
    return worst


@pytest.mark.slow
def test_fp32_logits_over_a_ragged_batch_match_torch(smol, smol_mlx):
    """On the embedded model, over short prompts: each row of an MLX fp32 ragged batch against the
    same row alone in MLX fp32 and in PyTorch fp32 (against the exact fp64 value: the tiny model's
    test below). PyTorch's own padded rows differ from its unpadded ones by up to 8e-5 on this
    model and each fp32 run is up to ~7e-5 from the fp64 value, so the two backends' mutual
    difference is held to 2e-4."""
    prompts = [smol.tokenizer.encode(t) for t in ("Hi", "Entropy is", "The sea")]
    assert len({len(p) for p in prompts}) == 3  # ragged: every row padded differently
    worst = _ragged(smol_mlx, smol, None, prompts)
    assert worst["torch"] < 2e-4, worst


def test_fp32_logits_over_a_ragged_batch_match_fp64_tiny():
    """The same batch on a tiny random model (a long prompt among short ones), also against each
    row alone in MLX fp64: fp32 within 1e-4 of the exact value."""
    import mlx.core as mx

    from entropix.backends.mlx.loader import load_checkpoint
    from mlxtiny import StateDictCheckpoint, mlx_twin
    from tinymodel import tiny_lm

    t = tiny_lm(seed=7)
    m = mlx_twin(t)
    exact = dataclasses.replace(m, model=load_checkpoint(StateDictCheckpoint(t.model), mx.float64)[0])
    prompts = [list(b"Hi"), list(b"The quick brown fox jumps over the lazy dog because"), list(b"Entropy is")]
    worst = _ragged(m, t, exact, prompts)
    assert worst["fp64"] < 1e-4 and worst["torch"] < 2e-4, worst


@pytest.mark.slow
def test_entropix_same_decisions_with_the_same_draws(smol, smol_mlx):
    """A smoke test of 8 tokens in two rows after a short prompt (every policy over many steps:
    tests/test_mlx_backend.py)."""
    dec = catalog.resolve("entropix", smol)  # the embedded model's built-in profile
    ids = smol.tokenizer.encode("Once upon a time")
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

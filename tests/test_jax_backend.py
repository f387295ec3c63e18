"""The JAX backend against the PyTorch one on tiny models: logits, attention statistics,
tokens and sampler decisions with injected draws; compilations; errors. Checkpoint files
(an HF folder, a GGUF file, bf16): tests/test_jax_e2e.py, on its tiny checkpoint."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from entropix import EntropixError
from entropix.backends.base import SampleGroup
from entropix.backends.jax import compiled
from entropix.backends.jax.backend import JaxBackend
from entropix.backends.torch.backend import TorchBackend
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.loading import load_model
from entropix.sampler.config import SamplerConfig, SamplingParams
from entropix.sampler.policy import Entropix, Greedy, Ranked, Sample

from jax_helpers import jax_twin
from jax_parity import assert_close
from tinymodel import tiny_lm

RAGGED = [[5, 6, 7], list(range(40, 60)), [9] * 11]  # one prefill shape (4 rows of 32) for the tests that share it
CFG = SamplerConfig(model="test", low_ent=5.0, low_vent=1.0, med_ent=6.0, high_ent=6.5, med_vent=2.0, high_vent=3.0)


@pytest.fixture(scope="module")
def pair():
    lm = tiny_lm(seed=3)
    return lm, jax_twin(lm)


def test_ragged_batch_logits_stats_and_tokens_match_torch(pair):
    """Ragged prefill with copies, greedy steps, a fork and a finish, rows joining mid-run,
    and a cache that grows past 256 slots: fp32 logits and attention within 1e-4."""
    lm, jl = pair
    jb, tb = JaxBackend(jl.model), TorchBackend(lm.model)
    for b in (jb, tb):
        b.prefill(RAGGED, [1, 2, 1], True)
    assert_close(jb, tb)
    for step in range(6):
        g = [SampleGroup(Greedy(), tuple(range(tb.rows)))]
        hj, ht = jb.sample(g, 4), tb.sample(g, 4)
        assert hj.token.tolist() == ht.token.tolist()
        np.testing.assert_array_equal(hj.top_ids, ht.top_ids)
        for key in ("entropy", "varentropy", "margin", "logprob", "top_logprobs", "attn"):
            np.testing.assert_allclose(getattr(hj, key), getattr(ht, key), atol=1e-4, rtol=0)
        assert hj.attn_valid.tolist() == ht.attn_valid.tolist() == [step % 2 == 1 or step == 0] * tb.rows
        for b in (jb, tb):
            b.advance(hj.token.tolist(), capture=step % 2 == 0)
        if step == 2:  # a fork of row 1, row 0 finishes, and a long prompt joins (capacity 256 -> 512)
            for b in (jb, tb):
                b.select([3, 1, 1, 2])
                b.prefill([list(range(1, 250))], [1], True)
        assert_close(jb, tb)
    assert jb.rows == tb.rows == 5 and jb.padded == 8


def _groups(rng, B, prev_pause: bool):
    ent = Entropix(CFG, pause_id=32)
    rows = np.arange(B)
    flags = np.stack([np.arange(B) % 3 == 0, np.arange(B) % 2 == 0], 1) if prev_pause else np.zeros((B, 2), bool)
    return [
        SampleGroup(Greedy(), (0,)),
        SampleGroup(Sample(SamplingParams(temperature=0.9, top_p=0.9)), (1, 2), uniforms=rng.random((2, 1))),
        SampleGroup(Sample(SamplingParams(temperature=1.2, top_k=20, min_p=0.02)), (3,), uniforms=rng.random((1, 1))),
        SampleGroup(Ranked(), (4, 5), ranks=np.array([3, -1])),
        SampleGroup(ent, tuple(int(r) for r in rows[6:]), uniforms=rng.random((B - 6, ent.draws)),
                    flags=flags[6:]),
    ]


def test_sampler_decisions_match_torch_with_injected_draws(pair):
    """Every policy in one step, entropix with and without pause flags: the same tokens and
    states as the PyTorch twin for the same uniforms."""
    lm, jl = pair
    jb, tb = JaxBackend(jl.model), TorchBackend(lm.model)
    prompts = [list(range(i, i + 3 + i % 7)) for i in range(1, 25)]
    for b in (jb, tb):
        b.prefill(prompts, [1] * len(prompts), True)
    rng = np.random.default_rng(0)
    codes = []
    for step in range(4):
        groups = _groups(rng, tb.rows, prev_pause=step % 2 == 1)
        hj, ht = jb.sample(groups, 3), tb.sample(groups, 3)
        assert hj.token.tolist() == ht.token.tolist()
        assert hj.code.tolist() == ht.code.tolist()
        codes += ht.code[6:].tolist()
        for b in (jb, tb):
            b.advance(ht.token.tolist(), True)
    assert len(set(codes)) >= 3, codes  # the thresholds reach several strategies


def test_entropix_run_through_the_engine_matches_torch(pair):
    """Seeded entropix decoding (the host draws the uniforms) of a ragged batch, a request of
    two rows among them: the same tokens and states, more than one strategy firing. The prompts
    and rows of the ragged test above: its prefill and decode programs serve this one too."""
    lm, jl = pair
    out = []
    for m in (lm, jl):
        reqs = [Request(prompt=p, policy=Entropix(CFG, pause_id=32), max_tokens=24, seed=5, stop_ids=frozenset(), n=n)
                for p, n in zip(RAGGED, [1, 2, 1])]
        which = {q.id: i for i, q in enumerate(reqs)}
        out.append([(which[r.request_id], r.choice, r.token, r.state) for r in generate(m.engine(), reqs)])
    assert out[0] == out[1]
    assert len({s for *_, s in out[0]}) >= 2  # several strategies compared, not one


def test_a_128_token_run_compiles_a_few_times():
    """A fresh model: one prefill, one decode step, one sampler step (and a few small ops),
    then nothing more; the same run again compiles nothing."""
    lm = tiny_lm(seed=1, intermediate_size=96)  # a config of its own: no compilations shared with other tests
    jl = jax_twin(lm)
    req = dict(prompt=list(range(1, 65)), policy=Greedy(), max_tokens=128, seed=0, stop_ids=frozenset())
    c0 = compiled.compilations()
    toks = [r.token for r in generate(jl.engine(), [Request(**req)])]
    first = compiled.compilations() - c0
    c1 = compiled.compilations()
    again = [r.token for r in generate(jl.engine(), [Request(**req)])]
    assert len(toks) == 128 and toks == again
    assert 3 <= first <= 8, first
    assert compiled.compilations() == c1


def test_bad_mesh_and_backend_options_are_one_line_errors():
    with pytest.raises(EntropixError, match="load_tensor_parallel"):  # torch ranks start elsewhere
        load_model(None, backend="torch", tp=2)
    with pytest.raises(EntropixError, match="backend jax"):
        load_model(None, backend="torch", dp=2)
    with pytest.raises(EntropixError, match="needs 64 devices"):
        from entropix.backends.jax.sharding import make_mesh

        make_mesh(tp=8, dp=8)
    with pytest.raises(EntropixError, match="at least 1"):
        make_mesh(tp=0)


def test_draws_from_per_row_jax_random_keys_follow_the_distribution():
    """uniforms_from_keys: explicit jax.random keys per row give uniforms that, through the
    same inverse-CDF draw, reproduce the filtered distribution (chi-square) and differ per row."""
    import jax.numpy as jnp
    from scipy.stats import chisquare

    from entropix.backends.jax import ops

    p = np.array([0.5, 0.25, 0.15, 0.1])
    logq = jnp.log(jnp.asarray(np.tile(p, (2, 1)), jnp.float32))
    keys = jax.random.split(jax.random.key(0), 2)
    u = ops.uniforms_from_keys(keys, 4000)  # [2, 4000]
    assert u.shape == (2, 4000) and float(u.min()) >= 0 and float(u.max()) < 1
    assert not np.allclose(np.asarray(u[0]), np.asarray(u[1]))
    pos = np.asarray(ops.draw_sorted(logq, u))
    for row in pos:
        counts = np.bincount(row, minlength=4)
        assert chisquare(counts, p * len(row)).pvalue > 1e-3


@pytest.mark.parametrize("argv, needle", [
    (["--backend", "jax", "--tp", "3"], "needs 3 devices"),
    (["--backend", "torch", "--dp", "2"], "--backend jax"),  # torch --tp starts ranks (test_tp.py)
    (["--backend", "mlx", "--tp", "2"], "runs on one device"),
    (["--backend", "jax", "--dp", "0"], "at least 1"),
    (["--backend", "jax", "--dtype", "int3"], "dtype"),
])
def test_cli_mesh_errors_are_one_line(argv, needle, capsys):
    from entropix.cli import main

    assert main(["generate", "hi", "-n", "2", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("entropix: error:")]
    assert len(errors) == 1 and needle in errors[0], errors

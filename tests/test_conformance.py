"""The sampler maths of every backend against one float64 reference (`entropix.sampler.reference`).

Backends: numpy (`adapters/ops.py`, what the llama.cpp and mlx-lm hooks run), torch, jax and
mlx, each skipped only when its package does not import. A backend's whole sample() step runs
on shared cases made here (every entropix state, exact ties among the top candidates and
across the ranking's edge, -inf logits, pause flags, top_k 1, min-p, temperature, a 5-token
and a 262144-token vocabulary), and so do the ops a step does not show (filters and draws,
the entropix plan from constructed metrics, the best-of-N score, attention metrics).

Exact: tokens, state codes, top ids, draw positions, integer top_k. Within tolerance (float32
backends against float64; the cases keep clear of float32 knife edges, except thresholds met
exactly, which are representable): entropy 1e-5 bits, varentropy 1e-4 bits^2 (rtol and atol),
log-probabilities and margins 1e-5 absolute, and 1e-4 for entropy and log-probabilities over
rows wider than 65536 tokens; filtered log q 1e-6; the entropix plan's parameters rtol 1e-5;
attention metrics 1e-6 (the constants below). The first tests check the reference itself
against known answers and target distributions.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import chisquare

from entropix.backends.base import SampleGroup, entropix_arrays
from entropix.decode.rng import uniforms
from entropix.sampler import reference as ref
from entropix.sampler.config import SamplerConfig, SamplingParams
from entropix.sampler.policy import (ADAPTIVE, BRANCH, ENTROPIX_STATES, FLOWING, PAUSE, RESAMPLE, TREADING, Entropix,
                                     Greedy, Ranked, Sample)

# Tolerances, float32 backend against the float64 reference (assert_allclose's rtol, atol). Up to
# 65536 tokens: entropy 1e-5 (bits), varentropy 1e-4 (bits^2), log-probabilities and margins 1e-5
# absolute. Wider rows lose more in float32 sums (torch's log_softmax normaliser is ~7e-5 off over
# 262144 tokens): entropy 1e-4, log-probabilities 1e-4 there.
WIDE = 65536
VARENTROPY_TOL = dict(rtol=1e-4, atol=1e-4)
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)  # the entropix plan's temperature, top_p and min_p
FILTER_TOL = dict(rtol=0, atol=1e-6)  # filtered log q over a few sorted candidates
ATTN_TOL = dict(rtol=1e-6, atol=1e-6)


def entropy_tol(vocab: int) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if vocab <= WIDE else dict(rtol=1e-4, atol=1e-4)


def logprob_tol(vocab: int) -> dict:
    """Log-probabilities, margins, filtered log q and best-of-N scores (nats)."""
    return dict(rtol=0, atol=1e-5) if vocab <= WIDE else dict(rtol=0, atol=1e-4)

NEG = -np.inf
PAUSE_ID = 7
PROBS = np.array([0.35, 0.25, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02])
CFG = SamplerConfig(model="test", low_ent=1.0, low_vent=1.0, med_ent=3.0, high_ent=5.0, med_vent=4.0, high_vent=8.0)
CFG_TINY = SamplerConfig(model="test", low_ent=0.5, low_vent=0.5, med_ent=1.0, high_ent=2.0, med_vent=1.0,
                         high_vent=0.8)
# thresholds in the range of random logits, so that every state occurs
CFG_RANDOM = SamplerConfig(low_ent=0.5, low_vent=0.5, med_ent=4.0, high_ent=6.0, med_vent=3.0, high_vent=2.0)
FRAMEWORK = {"numpy": "numpy", "torch": "torch", "jax": "jax", "mlx": "mlx.core"}


def f32(a) -> np.ndarray:
    """What every backend sees: inputs rounded to float32 (the reference reads the same numbers)."""
    return np.asarray(a, dtype=np.float32)


def draws(rng, n: int, k: int) -> np.ndarray:
    return f32(rng.random((n, k))).astype(np.float64)


# -- the backends ---------------------------------------------------------------------------------

class NumpyOps:
    """adapters/ops.py: host logits, float32."""

    def __init__(self):
        from entropix.adapters import ops

        self.ops, self.a = ops, f32

    def np(self, x):
        return np.asarray(x)

    def step(self, x, attn, groups, top_k):
        return self.ops.sample(x, groups, top_k, attn)

    def filter_draw(self, vals, params, u):
        logq = self.ops.filter_sorted(vals, *params)
        return logq, self.ops.draw_sorted(logq, u)

    def plan(self, policy, H, V, attn, ok):
        return self.ops.entropix_plan(policy, H, V, attn, ok)

    def entropix(self, policy, vals, ids, H, V, attn, u, prev, ok):
        return self.ops.entropix_tokens(policy, vals, ids, H, V, u, prev, ok, attn)

    def score(self, logq, model_logp, H, weight):
        return self.ops.entropix_score(logq, model_logp, H, weight)

    def attention(self, stats, batch):
        pytest.skip("adapters/ops.py has no attention metrics: the engines it serves give logits only")


class TorchOps:
    def __init__(self):
        import torch

        from entropix.backends.torch import ops
        from entropix.backends.torch.backend import TorchBackend
        from entropix.backends.torch.model import HeadStats

        self.torch, self.ops, self.Backend, self.HeadStats = torch, ops, TorchBackend, HeadStats

    def a(self, x):
        x = np.asarray(x)
        return self.torch.from_numpy(np.ascontiguousarray(x.astype(np.float32) if x.dtype == np.float64 else x))

    def np(self, x):
        return x.numpy()

    def step(self, x, attn, groups, top_k):
        """The backend's own sample() over pending logits set here (no model runs)."""
        b = self.Backend(SimpleNamespace(config=SimpleNamespace(vocab_size=x.shape[1]), device=self.torch.device("cpu")))
        b.slot, b.logits, b.attn = list(range(len(x))), self.a(x), self.a(attn)
        b.attn_valid = self.torch.ones(len(x), dtype=self.torch.bool)
        return b.sample(groups, top_k)

    def filter_draw(self, vals, params, u):
        logq = self.ops.filter_sorted(self.a(vals), *[self.a(p) if np.ndim(p) else p for p in params])
        return logq.numpy(), self.ops.draw_sorted(logq, self.a(u)).numpy()

    def _table(self, policy):
        return self.ops.entropix_table_tensors(policy, "cpu")

    def plan(self, policy, H, V, attn, ok):
        out = self.ops.entropix_plan(self._table(policy), policy, self.a(H), self.a(V), self.a(attn), _opt(self.a, ok))
        return [o.numpy() for o in out]

    def entropix(self, policy, vals, ids, H, V, attn, u, prev, ok):
        out = self.ops.entropix_tokens(self._table(policy), policy, self.a(vals), self.a(ids), self.a(H), self.a(V),
                                       self.a(attn), self.a(u), _opt(self.a, prev), _opt(self.a, ok))
        return [o.numpy() for o in out]

    def score(self, logq, model_logp, H, weight):
        return self.ops.entropix_score(self.a(logq), self.a(model_logp), self.a(H), weight).numpy()

    def attention(self, stats, batch):
        hs = [self.HeadStats(*(self.a(s) for s in layer)) for layer in stats]
        return self.ops.attention_metrics(hs, batch, "cpu").numpy()


class JaxOps:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        from entropix.backends.jax import ops, sharding
        from entropix.backends.jax.backend import JaxBackend
        from entropix.backends.jax.loader import JaxModel
        from entropix.config import ModelConfig

        self.jnp, self.ops, self.Backend, self.Model = jnp, ops, JaxBackend, JaxModel
        self.mesh = sharding.make_mesh(1, 1)
        self.config = lambda vocab: ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, rope_theta=10000.0, max_position_embeddings=64)
        # jitted as the backend runs them (and one compilation per shape instead of one per op)
        self._filter_draw = jax.jit(lambda vals, params, u: (q := ops.filter_sorted(vals, *params), ops.draw_sorted(q, u)))
        self._plan = jax.jit(ops.entropix_plan)
        self._tokens = jax.jit(ops.entropix_tokens)
        self._score = jax.jit(ops.entropix_score)

    def a(self, x):
        x = np.asarray(x)
        return self.jnp.asarray(x.astype(np.float32) if x.dtype == np.float64 else x)

    def step(self, x, attn, groups, top_k):
        """The backend's own sample() (the jitted step) over pending logits set here; no model runs."""
        model = self.Model(config=self.config(x.shape[1]), params={}, inv_freq=None, mesh=self.mesh,
                           dtype=self.jnp.float32)
        b = self.Backend(model)
        b.state, b.lengths, b.attn_valid = (None, self.a(x), self.a(attn)), [0] * len(x), np.ones(len(x), bool)
        return b.sample(groups, top_k)

    def filter_draw(self, vals, params, u):
        logq, pos = self._filter_draw(self.a(vals), tuple(self.a(p) for p in params), self.a(u))
        return np.asarray(logq), np.asarray(pos)

    def _table(self, policy):
        return {k: self.jnp.asarray(v) for k, v in entropix_arrays(policy).items()}

    def plan(self, policy, H, V, attn, ok):
        return [np.asarray(o) for o in self._plan(self._table(policy), self.a(H), self.a(V), self.a(attn),
                                                  _opt(self.a, ok))]

    def entropix(self, policy, vals, ids, H, V, attn, u, prev, ok):
        """As the backend calls it, but rows padded to 256 or 512 and the flags always given
        (all False is what None means): fewer compilations. The steps take the None routes."""
        B = len(H)
        pad = lambda a: self.a(np.concatenate([a, np.repeat(a[:1], -B % 256, 0)]))  # noqa: E731
        prev, ok = (np.zeros(B, bool) if f is None else f for f in (prev, ok))
        out = self._tokens(self._table(policy), *map(pad, (vals, ids, H, V, attn, u, prev, ok)))
        return [np.asarray(o)[:B] for o in out]

    def score(self, logq, model_logp, H, weight):
        return np.asarray(self._score(self.a(logq), self.a(model_logp), self.a(H), weight))

    def attention(self, stats, batch):
        return np.asarray(self.ops.attention_metrics([tuple(self.a(s) for s in layer) for layer in stats], batch))


class MlxOps:
    def __init__(self):
        import mlx.core as mx

        from entropix.backends.mlx import ops
        from entropix.backends.mlx.backend import MLXBackend
        from entropix.backends.mlx.model import HeadStats

        self.mx, self.ops, self.Backend, self.HeadStats = mx, ops, MLXBackend, HeadStats

    def a(self, x):
        x = np.asarray(x)
        x = x.astype(np.float32) if x.dtype == np.float64 else x.astype(np.int32) if x.dtype == np.int64 else x
        return self.mx.array(x)

    def np(self, x):
        return np.array(x)

    def step(self, x, attn, groups, top_k):
        """The backend's own sample() over pending logits set here (no model runs)."""
        b = self.Backend(None, SimpleNamespace(vocab_size=x.shape[1]))
        b.logits, b.attn, b.attn_valid = self.a(x), self.a(attn), self.mx.ones((len(x),), dtype=self.mx.bool_)
        return b.sample(groups, top_k)

    def filter_draw(self, vals, params, u):
        logq = self.ops.filter_sorted(self.a(vals), *[self.a(p) if np.ndim(p) else p for p in params])
        return np.array(logq), np.array(self.ops.draw_sorted(logq, self.a(u)))

    def plan(self, policy, H, V, attn, ok):
        out = self.ops.entropix_plan(self.ops.entropix_table_arrays(policy), policy, self.a(H), self.a(V),
                                     self.a(attn), _opt(self.a, ok))
        return [np.array(o) for o in out]

    def entropix(self, policy, vals, ids, H, V, attn, u, prev, ok):
        out = self.ops.entropix_tokens(self.ops.entropix_table_arrays(policy), policy, self.a(vals), self.a(ids),
                                       self.a(H), self.a(V), self.a(attn), self.a(u), _opt(self.a, prev),
                                       _opt(self.a, ok))
        return [np.array(o) for o in out]

    def score(self, logq, model_logp, H, weight):
        return np.array(self.ops.entropix_score(self.a(logq), self.a(model_logp), self.a(H), weight))

    def attention(self, stats, batch):
        hs = [self.HeadStats(*(self.a(s) for s in layer)) for layer in stats]
        return np.array(self.ops.attention_metrics(hs, batch))


def _opt(conv, flags):
    """Pause flags as the backends take them: None when no row has one."""
    return None if flags is None or not np.any(flags) else conv(flags)


HARNESS = {"numpy": NumpyOps, "torch": TorchOps, "jax": JaxOps, "mlx": MlxOps}
_MADE: dict[str, object] = {}


@pytest.fixture(params=list(HARNESS))
def backend(request):
    name = request.param
    try:
        importlib.import_module(FRAMEWORK[name])
    except ImportError as e:
        pytest.skip(f"{name} does not import here: {e}")
    if name not in _MADE:
        _MADE[name] = HARNESS[name]()
    return _MADE[name]


# -- the reference's sample() step ----------------------------------------------------------------

def _ref_entropix(g, x, logp, H, V, attn):
    p = g.policy
    ids = ref.rank(x)[:, :min(p.config.max_top_k, x.shape[1])]
    return ref.entropix_tokens(p, np.take_along_axis(logp, ids, -1), ids, H, V, g.uniforms,
                               attn if p.attention else None, g.flags[:, 0], g.flags[:, 1])


REF_OPS = {
    Greedy: lambda g, x, logp, H, V, attn: (ref.rank(x)[:, 0], np.zeros(len(x), np.int64)),
    Sample: lambda g, x, logp, H, V, attn: (ref.sample_tokens(g.policy.params, x, g.uniforms), np.zeros(len(x), np.int64)),
    Ranked: lambda g, x, logp, H, V, attn: ref.ranked_tokens(x, g.ranks),
    Entropix: _ref_entropix,
}


def reference_step(x, attn, groups, top_k) -> dict[str, np.ndarray]:
    logp, H, V = ref.logit_metrics(x)
    token, code = np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
    for g in groups:
        r = list(g.rows)
        token[r], code[r] = REF_OPS[type(g.policy)](g, x[r], logp[r], H[r], V[r], attn[r])
    ids = ref.rank(x)[:, :top_k]
    return dict(token=token, code=code, logprob=logp[np.arange(len(x)), token], entropy=H, varentropy=V,
                margin=ref.margin(logp), top_ids=ids, top_logprobs=np.take_along_axis(logp, ids, -1))


def check_step(backend, x, groups, top_k, attn=None):
    """The backend's step equals the reference's: exact ids, codes and tokens, metrics within
    tolerance. Returns (the reference's step, the backend's StepHost)."""
    x = f32(x)
    attn = f32(np.zeros((len(x), 4)) if attn is None else attn)
    want = reference_step(x.astype(np.float64), attn.astype(np.float64), groups, top_k)
    got = backend.step(x, attn, groups, top_k)
    for key in ("top_ids", "code", "token"):
        np.testing.assert_array_equal(getattr(got, key), want[key], err_msg=key)
    np.testing.assert_allclose(got.entropy, want["entropy"], **entropy_tol(x.shape[1]), err_msg="entropy")
    np.testing.assert_allclose(got.varentropy, want["varentropy"], **VARENTROPY_TOL, err_msg="varentropy")
    for key in ("margin", "logprob", "top_logprobs"):
        np.testing.assert_allclose(getattr(got, key), want[key], **logprob_tol(x.shape[1]), err_msg=key)
    np.testing.assert_allclose(got.attn, attn, **ATTN_TOL)
    return want, got


def group(policy, rows, rng, flags=None, ranks=None) -> SampleGroup:
    n = len(rows)
    if isinstance(policy, Entropix) and flags is None:
        flags = np.zeros((n, 2), bool)
    return SampleGroup(policy, tuple(rows), uniforms=draws(rng, n, max(policy.draws, 1)),
                       flags=None if flags is None else np.asarray(flags, bool), ranks=ranks)


# -- logits with known answers and the entropix states --------------------------------------------

def row(vocab: int, values: dict[int, float], fill: float = NEG) -> np.ndarray:
    x = np.full(vocab, fill)
    x[list(values)] = list(values.values())
    return x


def mixture(vocab: int, top: float, tail: int) -> np.ndarray:
    """Probability `top` on token 0, the rest spread evenly over `tail` other tokens."""
    x = np.full(vocab, NEG)
    x[1:tail + 1], x[0] = math.log((1 - top) / tail), math.log(top)
    return x


def plateau(vocab: int, rng, high: int, tied: int) -> np.ndarray:
    """`high` distinct large logits, then `tied` equal ones (ids scattered), the rest lower."""
    x = rng.normal(-6.0, 0.5, vocab)
    ids = rng.permutation(vocab)
    x[ids[:high]] = rng.uniform(2.0, 4.0, high)
    x[ids[high:high + tied]] = 1.0
    return x


def known_answer_cases() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Logits [10, 49152] whose metrics are known in closed form: uniform over every token, over 2, 7
    and 64 of them and over 32 among -inf, two-point distributions, a fork plus a long tail. Returns
    the logits, their [10] entropy, varentropy and margin, and [10, 3] absolute tolerances a float32
    backend meets for the three."""
    x, want = np.full((10, 49152), NEG), []
    x[0] = 0.0
    for i, n in enumerate((2, 7, 64), 1):
        x[i, :n] = 0.0
    x[:4, 0] = 0.0
    want += [(math.log2(n), 0.0, 0.0, 1e-4, 1e-4, 1e-6) for n in (49152, 2, 7, 64)]
    x[4, 10:42] = 3.0
    want.append((5.0, 0.0, 0.0, 1e-5, 1e-5, 1e-6))
    for i, p in enumerate((0.5, 0.9, 0.99, 0.3), 5):
        x[i, 3], x[i, 17] = math.log(p), math.log(1 - p)
        want.append((-(p * math.log2(p) + (1 - p) * math.log2(1 - p)),
                     p * (1 - p) * (math.log2(p) - math.log2(1 - p)) ** 2,  # a two-valued surprisal
                     abs(2 * p - 1), 1e-5, 1e-4, 1e-5))
    x[9, :4097], x[9, 0] = math.log(0.5 / 4096), math.log(0.5)  # surprisal 1 or 13 bits, equally likely
    want.append((7.0, 36.0, 0.5 - 0.5 / 4096, 1e-3, 1e-2, 1e-5))
    H, V, margin, *tol = np.array(want).T
    return x, H, V, margin, np.stack(tol, 1)


# -- the reference against known answers -------------------------------------------------------------

def test_reference_metrics_known_answers():
    x, H, V, margin, _ = known_answer_cases()
    logp, h, v = ref.logit_metrics(x)
    np.testing.assert_allclose(h, H, rtol=0, atol=1e-9)
    np.testing.assert_allclose(v, V, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ref.margin(logp), margin, rtol=0, atol=1e-12)


def test_reference_attention_known_answers():
    # head 0 attends to one key (0 bits), head 1 to two keys evenly (1 bit)
    layer = ([[0.0, 1.0]], [[1.0, 1.0]], [[2.0, 1.0]])
    assert ref.attention_metrics([layer], 1)[0].tolist() == pytest.approx([0.5, 0.25, 1.0, 1.5])
    other = ([[2.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]])  # two layers are averaged
    assert ref.attention_metrics([layer, other], 1)[0].tolist() == pytest.approx([1.25, 0.125, 0.5, 0.75])
    assert ref.attention_metrics([], 3).tolist() == [[0.0] * 4] * 3


def target(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution each filter should leave over PROBS, computed step by step."""
    p = PROBS ** (1.0 / temperature)
    p = p / p.sum()
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep[top_k:] = False  # PROBS is sorted
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if top_p < 1:
        keep &= (np.cumsum(q) - q) < top_p
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if min_p:
        keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


FILTERS = [{"temperature": 1.0}, {"temperature": 0.5}, {"temperature": 1.7}, {"top_k": 3}, {"top_p": 0.7},
           {"top_p": 0.5, "temperature": 1.3}, {"min_p": 0.2}, {"top_k": 5, "top_p": 0.9, "min_p": 0.1, "temperature": 0.8}]
N_DRAWS = 20000


def filter_params(d: dict) -> tuple:
    return d.get("temperature", 1.0), d.get("top_k", 0), d.get("top_p", 1.0), d.get("min_p", 0.0)


def host_uniforms(n: int, seed: int = 0) -> np.ndarray:
    return f32(uniforms(np.arange(n, dtype=np.uint64) + seed * 1_000_003, np.zeros(n), 1)).astype(np.float64)


def counts(tokens, n: int = 8) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=n).astype(float)


@pytest.mark.parametrize("params", FILTERS)
def test_reference_filters_reproduce_target_distribution(params):
    logq = ref.filter_sorted(np.log(PROBS)[None], *filter_params(params))
    c = counts(ref.draw_sorted(np.repeat(logq, N_DRAWS, 0), host_uniforms(N_DRAWS))[:, 0])
    q = target(**params)
    assert c[q == 0].sum() == 0, "a filtered-out token was drawn"
    assert chisquare(c[q > 0], q[q > 0] * c.sum()).pvalue > 1e-3, (params, c, q)
    if params == {"temperature": 1.0}:  # the test can fail: these draws do not fit the temperature-0.5 target
        assert chisquare(c, target(temperature=0.5) * c.sum()).pvalue < 1e-6


def test_reference_sample_on_unsorted_logits_reproduces_the_distribution():
    perm = np.random.default_rng(3).permutation(8)
    x = np.repeat(np.log(PROBS)[perm][None], N_DRAWS, 0)
    for params, q in ((SamplingParams(temperature=0.8, top_p=0.9), target(0.8, top_p=0.9)),
                      (SamplingParams(top_k=3), target(top_k=3))):
        c = counts(perm[ref.sample_tokens(params, x, host_uniforms(N_DRAWS, seed=2))])  # back to PROBS order
        assert c[q == 0].sum() == 0 and chisquare(c[q > 0], q[q > 0] * c.sum()).pvalue > 1e-3


def test_reference_filter_edge_cases():
    lg = np.log(PROBS)[None]
    np.testing.assert_allclose(np.exp(ref.filter_sorted(lg, 1.0, 0, 1.0, 0.0)), PROBS[None], atol=1e-12)
    for k, p in ((1, 1.0), (0, 1e-6)):  # top-1 and a tiny nucleus keep the most likely token
        lp = ref.filter_sorted(lg, 1.0, k, p, 0.0)
        assert np.isfinite(lp).sum() == 1 and lp.argmax() == 0
    # a uniform at the very top of [0, 1) still picks a kept token
    assert ref.draw_sorted(ref.filter_sorted(lg, 1.0, 3, 1.0, 0.0), [[1 - 1e-12]]).item() == 2
    # ties rank by lower id first, -inf last
    assert ref.rank([[1.0, 3.0, NEG, 3.0, 1.0, -0.0, 0.0]]).tolist() == [[1, 3, 0, 4, 5, 6, 2]]


# -- every backend against the reference ----------------------------------------------------------

def test_metrics_with_known_answers(backend):
    """A greedy step over the known-answer logits; a row alone gives what it gives in a batch."""
    rng = np.random.default_rng(0)
    x, H, V, margin, tol = known_answer_cases()
    got = check_step(backend, x, [group(Greedy(), range(len(x)), rng)], 2)[1]
    for i, (value, want) in enumerate(zip(("entropy", "varentropy", "margin"), (H, V, margin))):
        assert (np.abs(getattr(got, value) - want) <= tol[:, i]).all(), (value, getattr(got, value), want)
    x = f32(rng.normal(0, 4, (3, 300)))
    both = backend.step(x, f32(np.zeros((3, 4))), [group(Greedy(), range(3), rng)], 2)
    for i in range(3):
        alone = backend.step(x[i:i + 1], f32(np.zeros((1, 4))), [group(Greedy(), [0], rng)], 2)
        for key in ("entropy", "varentropy", "margin"):
            assert getattr(both, key)[i] == pytest.approx(getattr(alone, key)[0], abs=1e-5)


def regime_case(rng) -> tuple[np.ndarray, list[SampleGroup], np.ndarray]:
    """600 tokens: one entropix row per state, pause rows, ties and -inf rows under every policy, then
    192 random rows for a second entropix profile (rows 23 on)."""
    V = 600
    flat = row(V, {i: 0.0 for i in range(100, 164)})  # H = 6 bits, V = 0: uncertain and flat
    flat_with_pause = row(V, {i: 0.0 for i in range(64)})  # ... with the pause token among them
    ties = rng.normal(0, 0.5, V)
    ties[[300, 17, 250, 90, 5]] = 4.0
    rows = [row(V, {42: 30.0}, 0.0), flat, flat_with_pause, mixture(V, 0.9, 256), mixture(V, 0.5, 256),
            row(V, {10: math.log(0.5), 11: math.log(0.3), 12: math.log(0.2)}),
            row(V, {PAUSE_ID: 20.0, 3: 10.0}),  # flowing, its argmax the pause token, just after a pause
            row(V, {5: 1.0, 9: 1.0, 2: 2.0}), ties]
    flags = [[0, 1], [0, 1], [1, 0], [0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [1, 1]]
    rows += [row(V, {77: 5.0, 12: 5.0, 500: 5.0}, 0.0), row(V, {30: 2.0, 8: 2.0, 9: 1.0})]  # greedy: tied argmax
    rows += [rng.normal(0, 2, V), ties, plateau(V, rng, 3, 12), row(V, {8: 1.0, 3: 1.0, 4: 0.5})]  # sampled
    rows += [plateau(V, rng, 2, 10), ties, rng.normal(0, 3, V), plateau(V, rng, 3, 20)]
    rows += [ties, rng.normal(0, 1, V), row(V, {40: 1.0, 41: 0.0, 3: 1.0}), plateau(V, rng, 60, 150)]  # ranked
    ent = Entropix(CFG, PAUSE_ID)
    groups = [group(ent, range(9), rng, flags=flags), group(Greedy(), [9, 10], rng),
              group(Sample(SamplingParams(temperature=0.7, top_p=0.9)), [11, 12], rng),
              group(Sample(SamplingParams(top_k=1)), [13, 14], rng),
              group(Sample(SamplingParams(temperature=1.3, min_p=0.2)), [15, 16], rng),
              group(Sample(SamplingParams(temperature=0.9, top_k=5, top_p=0.8)), [17, 18], rng),
              group(Ranked(), [19, 20, 21, 22], rng, ranks=np.array([3, 0, -1, 99]))]  # 99: inside the tie at 100
    # logits-only entropix on random rows, from near-uniform to peaked, a fifth of them just after a pause
    rows += list(rng.standard_normal((192, V)) * np.exp(rng.uniform(-2.0, 2.5, (192, 1))))
    prev = np.arange(192) % 5 == 0
    groups.append(group(Entropix(CFG_RANDOM, PAUSE_ID, attention=False), range(23, 23 + 192), rng,
                        flags=np.stack([prev, ~prev], 1)))
    attn = rng.uniform(0, 1.5, (len(rows), 4))  # the random rows' table gives them no weight
    return np.stack(rows), groups, attn


def test_step_reaches_every_state_and_breaks_ties_by_lower_id(backend):
    rng = np.random.default_rng(1)
    x, groups, attn = regime_case(rng)
    want = check_step(backend, x, groups, 8, attn)[0]
    code, token = want["code"], want["token"]
    assert code[:9].tolist() == [FLOWING, PAUSE, TREADING, BRANCH, RESAMPLE, ADAPTIVE, FLOWING, ADAPTIVE, code[8]]
    assert token[0] == 42 and token[1] == PAUSE_ID and token[2] != PAUSE_ID and token[5] in (10, 11, 12)
    assert token[6] == 3  # the pause token never follows itself
    assert token[7] in (2, 5, 9) and token[9] == 12 and token[10] == 8  # ties: the lower id
    assert token[13] == x[13].argmax() and token[14] == 3  # top_k 1 is the argmax, lower id first
    assert token[19] == 250 and token[21] == 3  # rank 3 among tied ids 5, 17, 90, 250, 300; rank -1: the argmax
    assert want["top_ids"][9, :3].tolist() == [12, 77, 500]
    code, token, prev = code[23:], token[23:], np.arange(192) % 5 == 0
    assert set(code.tolist()) == set(range(len(ENTROPIX_STATES)))  # random logits reach every state too
    assert not np.any(prev & (token == PAUSE_ID))


def test_step_samples_unsorted_logits(backend):
    """The Sample policy over shuffled candidates: the draws the reference makes from the same host
    uniforms, which reproduce the target distributions."""
    perm = np.random.default_rng(3).permutation(8)
    x = np.repeat(np.log(PROBS)[perm][None], 2 * N_DRAWS, 0)
    groups = [SampleGroup(Sample(SamplingParams(temperature=0.8, top_p=0.9)), tuple(range(N_DRAWS)),
                          uniforms=host_uniforms(N_DRAWS, seed=2)),
              SampleGroup(Sample(SamplingParams(top_k=3)), tuple(range(N_DRAWS, 2 * N_DRAWS)),
                          uniforms=host_uniforms(N_DRAWS, seed=2))]
    check_step(backend, x, groups, 2)


def test_step_tiny_vocabulary(backend):
    rng = np.random.default_rng(2)
    x = np.array([[0.0] * 5, [10.0, 0, 0, 0, 0], [1.0, 1.0, 0.0, NEG, NEG], [0.3, 2.0, 0.3, 2.0, 0.3],
                  [0.5, 0.2, 0.1, 0.1, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 2.0, NEG, 1.0],
                  [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, NEG, 1.0, 1.0, NEG]])
    flags = [[0, 1], [0, 1], [1, 0], [0, 1]]
    groups = [group(Entropix(CFG_TINY, pause_id=3), range(4), rng, flags=flags),
              group(Entropix(CFG_TINY), [4], rng), group(Greedy(), [5], rng),  # no pause flags: those ops are left out
              group(Sample(SamplingParams(top_k=1)), [6], rng), group(Sample(SamplingParams(min_p=0.5)), [7], rng),
              group(Ranked(), [8], rng, ranks=np.array([1]))]
    want = check_step(backend, x, groups, 3, rng.uniform(0, 1, (len(x), 4)))[0]
    assert want["code"][0] == PAUSE and want["code"][1] == FLOWING and want["token"][6] == 0
    assert want["token"][5] == 0 and want["token"][8] == 2


def test_step_wide_vocabulary(backend):
    rng = np.random.default_rng(3)
    x = np.stack([np.zeros(262144), rng.normal(0, 2, 262144)])  # uniform: 18 bits, every token tied
    # most of the mass on 12 tokens: a float32 cumulative sum over thousands of tiny tail probabilities
    # moves the top-p edge by a few tokens (MLX's by hundreds), and exact tokens there would test rounding
    x[1, rng.choice(262144, 12, replace=False)] = rng.uniform(14.0, 16.0, 12)
    groups = [group(Entropix(CFG, PAUSE_ID), [0], rng, flags=[[0, 1]]),
              group(Sample(SamplingParams(temperature=0.8, top_p=0.95)), [1], rng)]
    want = check_step(backend, x, groups, 4)[0]
    assert want["code"][0] == PAUSE and want["top_ids"][0].tolist() == [0, 1, 2, 3]


def check_filter(backend, vals, params, u):
    """The backend's filter and draw equal the reference's: the same kept candidates, log q within
    tolerance, the same positions. Returns the reference's positions."""
    vals, u = f32(vals), f32(u).astype(np.float64)
    want_q = ref.filter_sorted(vals.astype(np.float64), *params)
    want = ref.draw_sorted(want_q, u)
    logq, pos = backend.filter_draw(vals, params, u)
    np.testing.assert_array_equal(np.isfinite(logq), np.isfinite(want_q))
    np.testing.assert_allclose(np.where(np.isfinite(want_q), logq, 0), np.where(np.isfinite(want_q), want_q, 0),
                               **FILTER_TOL)
    np.testing.assert_array_equal(pos, want)
    return want


def test_filters_and_draws(backend):
    """In one batch of per-row parameters: every filter setting whose target distribution the
    reference reproduces (the same 20000 host draws each), top_k 1, a tiny nucleus, and ties and
    -inf rows with mixed settings."""
    settings = FILTERS + [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.5, "temperature": 0.6}]
    ties = np.array([[3, 3, 3, 1, 1, 0, NEG, NEG], [2, 1, 1, 1, 1, 1, 1, 1], [0] * 8, [5] + [NEG] * 7,
                     np.log(PROBS), [1, 1, 0.5, 0.5, 0.2, 0.2, NEG, NEG]])
    tie_params = [(1.0, 0, 1.0, 0.0), (0.7, 3, 0.8, 0.1), (1.3, 5, 0.5, 0.0), (1.0, 1, 1.0, 0.0), (0.5, 4, 0.9, 0.3),
                  (2.0, 0, 0.6, 0.5)]
    n = 2000
    vals = np.concatenate([np.repeat(np.log(PROBS)[None], N_DRAWS * len(settings), 0), np.repeat(ties, n, 0)])
    params = tuple(np.concatenate([np.repeat(a, N_DRAWS), np.repeat(b, n)])
                   for a, b in zip(zip(*map(filter_params, settings)), zip(*tie_params)))
    u = np.concatenate([host_uniforms(N_DRAWS)] * len(settings) + [host_uniforms(n * len(ties), seed=5)])
    pos = check_filter(backend, vals, params, u)[:, 0]
    tie_pos = pos[N_DRAWS * len(settings):].reshape(len(ties), n)
    assert [set(p.tolist()) for p in tie_pos[2:5]] == [{0, 1, 2}, {0}, {0, 1}]
    assert check_filter(backend, np.log(PROBS)[None], (1.0, 3, 1.0, 0.0), [[1 - 1e-12]]).item() == 2


def test_entropix_plan_from_constructed_metrics(backend):
    """Metrics in every state and exactly on each threshold, with and without pause, with the
    attention features and logits only: the same codes and parameters."""
    H = np.array([0.5, 6.0, 6.0, 2.0, 4.0, 2.0, 0.5, 2.5, 40.0, 1.0, 0.5, 5.0, 3.0, 6.0, 4.5, 2.0])
    V = np.array([0.5, 2.0, 2.0, 10.0, 10.0, 3.0, 30.0, 6.0, 900.0, 0.5, 1.0, 3.0, 8.0, 4.0, 7.5, 3.0])
    ok = np.arange(len(H)) % 3 != 2
    attn = np.random.default_rng(6).uniform(0, 1.5, (len(H), 4))
    attn[6:9] = [20.0, 50.0, 0.0, 100.0]  # far out: the clamps hold
    for policy in (Entropix(CFG), Entropix(CFG, attention=False)):
        for flags in (None, ok):
            want = ref.entropix_plan(policy, H, V, attn, flags)
            got = backend.plan(policy, f32(H), f32(V), f32(attn), flags)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[2], want[2])
            for g, w in zip(got[1::2], want[1::2]):
                np.testing.assert_allclose(g, w, **PARAM_TOL)
            np.testing.assert_allclose(got[4], want[4], **PARAM_TOL)
    code, temp, k, p, m = ref.entropix_plan(Entropix(CFG), H, V, attn, ok)
    assert set(code.tolist()) == set(range(len(ENTROPIX_STATES)))
    assert code[9:14].tolist() == [ADAPTIVE, ADAPTIVE, TREADING, RESAMPLE, ADAPTIVE]  # on the thresholds
    assert (temp > 0).all() and (temp <= CFG.max_temperature).all() and (k >= 1).all() and (k <= CFG.max_top_k).all()
    assert ((p > 0) & (p <= 1)).all() and ((m >= 0) & (m <= 0.5)).all()
    t = ref.entropix_plan(Entropix(CFG), [2.0, 4.5], [3.0, 7.5], np.zeros((2, 4)))[1]
    assert t[0] < t[1] <= CFG.max_temperature  # hotter with uncertainty, up to the bound


def check_entropix(backend, policy, x, H=None, V=None, u=None, flags=None, attn=None, seed=0):
    """The backend's entropix tokens and codes from the max_top_k most likely of the logits x and
    the given (or the logits') metrics equal the reference's, which it returns."""
    x = f32(x).astype(np.float64)
    B, K = len(x), min(policy.config.max_top_k, x.shape[1])
    logp, h, v = ref.logit_metrics(x)
    H, V = (f32(h if H is None else H).astype(np.float64), f32(v if V is None else V).astype(np.float64))
    u = draws(np.random.default_rng(seed), B, policy.draws) if u is None else f32(u).astype(np.float64)
    flags = np.zeros((B, 2), bool) if flags is None else np.asarray(flags, bool)
    attn = f32(np.zeros((B, 4)) if attn is None else attn).astype(np.float64)
    ids = ref.rank(x)[:, :K]
    vals = f32(np.take_along_axis(logp, ids, -1)).astype(np.float64)
    want = ref.entropix_tokens(policy, vals, ids, H, V, u, attn, flags[:, 0], flags[:, 1])
    prev, ok = (f if f.any() else None for f in flags.T)
    got = backend.entropix(policy, f32(vals), ids, f32(H), f32(V), f32(attn), u, prev, ok)
    np.testing.assert_array_equal(got[1], want[1], err_msg="codes")
    np.testing.assert_array_equal(got[0], want[0], err_msg="tokens")
    return want


def test_entropix_tokens_in_every_state(backend):
    """Random metrics, attention and pause flags over 240 rows reach every state; constructed
    metrics name each one (as test_step does from logits)."""
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, (240, 500))
    prev = rng.random(240) < 0.3
    policy = Entropix(CFG, pause_id=int(np.argmax(x[0])))
    tokens, codes = check_entropix(backend, policy, x, rng.uniform(0, 7, 240), rng.uniform(0, 11, 240),
                                   flags=np.stack([prev, ~prev & (rng.random(240) < 0.7)], 1),
                                   attn=rng.uniform(0, 1.5, (240, 4)))
    assert set(codes.tolist()) == set(range(len(ENTROPIX_STATES)))
    x = np.random.default_rng(0).normal(size=(6, 500))
    flags = [[0, 1], [0, 1], [1, 0], [0, 1], [0, 1], [0, 1]]
    tokens, codes = check_entropix(backend, Entropix(CFG, PAUSE_ID), x, [0.5, 6.0, 6.0, 2.0, 4.0, 2.0],
                                   [0.5, 2.0, 2.0, 10.0, 10.0, 3.0], flags=flags)
    assert [ENTROPIX_STATES[c] for c in codes] == ["flowing", "pause", "treading", "branch", "resample", "adaptive"]
    assert tokens[0] == x[0].argmax() and tokens[1] == PAUSE_ID and tokens[2] != PAUSE_ID


def test_entropix_pause_never_follows_itself(backend):
    """A flowing row whose argmax is the pause token, right after a pause, takes the next best; a
    flat row just after a pause never draws it (fails if the mask is removed)."""
    x = np.full((2, 300), NEG)
    x[:, PAUSE_ID], x[:, 3] = 20.0, 10.0
    tokens, codes = check_entropix(backend, Entropix(CFG, PAUSE_ID), x, [0.2, 0.2], [0.2, 0.2],
                                   flags=[[1, 0], [0, 1]])
    assert codes.tolist() == [FLOWING, FLOWING] and tokens.tolist() == [3, PAUSE_ID]
    flat = np.full((400, 300), NEG)
    flat[:, :8] = 0.0
    tokens, _ = check_entropix(backend, Entropix(CFG, PAUSE_ID), flat, [2.0] * 400, [3.0] * 400, flags=[[1, 0]] * 400)
    assert PAUSE_ID not in tokens.tolist() and len(set(tokens.tolist())) > 3


def test_entropix_best_of_n(backend):
    """Adaptive rows keep the best typicality-adjusted score of their candidates, not the first
    draw; the score differs per candidate."""
    cfg = dataclasses.replace(CFG, n_candidates=2, top_k=27, top_p=1.0, min_p=0.0, typicality_weight=2.0)
    x = row(300, {5: math.log(0.6), 6: math.log(0.35), 9: math.log(0.05)})[None]
    # H = 1.2 bits: token 5 (surprisal 0.74) is typical, token 9 (4.3 bits) is not; draw 0 lands on 9
    u = [[0.999, 0.1]]
    tokens, codes = check_entropix(backend, Entropix(cfg), x, V=[0.5], u=u)
    first, _ = check_entropix(backend, Entropix(dataclasses.replace(cfg, n_candidates=1)), x, V=[0.5], u=[[0.999]])
    assert codes.tolist() == [ADAPTIVE] and first.tolist() == [9] and tokens.tolist() == [5]
    logq, model_logp = np.array([[-1.0, -1.0, -1.2]]), np.array([[-0.1, -2.0, -2.1]]) * math.log(2)
    want = ref.entropix_score(logq, model_logp, [2.0], 0.5)
    assert want[0, 1] > want[0, 0] and want[0, 2] > want[0, 0]  # typical beats atypical, per candidate
    got = backend.score(f32(logq), f32(model_logp), f32([2.0]), 0.5)
    np.testing.assert_allclose(got, want, **logprob_tol(3))


def test_entropix_rows_are_their_own(backend):
    """One row's metrics never steer another's choice; the same draws give the same token and
    rows draw from their own streams."""
    x = np.random.default_rng(3).normal(0, 2, (2, 400))
    u = draws(np.random.default_rng(7), 2, CFG.n_candidates)
    outs = {tuple(check_entropix(backend, Entropix(CFG, PAUSE_ID), x, [2.0, h], [3.0, v], u=u, flags=[[0, 1]] * 2)
                  [i][0] for i in range(2))
            for h, v in ((0.1, 0.1), (6.0, 1.0), (2.0, 20.0), (9.0, 30.0))}  # row 1 in every state
    assert len(outs) == 1
    flat = np.zeros((2, 400))  # identical rows: only the draws differ
    a = [check_entropix(backend, Entropix(CFG), flat, [2.0] * 2, [3.0] * 2, u=u)[0].tolist() for _ in range(2)]
    assert a[0] == a[1] and a[0][0] != a[0][1]


def test_attention_metrics(backend):
    """Per-head statistics of captured layers, averaged the same way: a known answer and random ones."""
    known = [([[0.0, 1.0]], [[1.0, 1.0]], [[2.0, 1.0]]), ([[2.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]])]
    rng = np.random.default_rng(8)
    layers = [tuple(rng.uniform(0, 3, (5, 8)) for _ in range(3)) for _ in range(3)]
    for stats, batch in ((known[:1], 1), (known, 1), (layers, 5)):
        stats = [tuple(f32(a) for a in layer) for layer in stats]
        np.testing.assert_allclose(backend.attention(stats, batch), ref.attention_metrics(stats, batch), **ATTN_TOL)

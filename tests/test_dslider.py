"""DSlider: hand-derived answers for its maths (numpy reference and torch device code), the
decision, state updates, no NaN in random steps, per-row state that forks with its row, the
config file, and `entropix generate --sampler dslider --seed 1 --json` reproducible."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from entropix import EntropixError
from entropix.backends.torch import dslider as D
from entropix.cli import main
from entropix.decode.engine import Engine, generate
from entropix.decode.records import Request
from entropix.sampler import catalog
from entropix.sampler import dslider as R
from entropix.sampler.dslider import DSlider, DSliderConfig

from tiny import write_hf_model
from tinymodel import tiny_lm

C = DSliderConfig()


def t32(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def expected_log(alpha):
    a = np.asarray(alpha, dtype=np.float64)
    return R.polygamma(0, a) - R.polygamma(0, np.array([a.sum()]))[0]


# -- helpers with known answers ---------------------------------------------------------------

def test_polygamma_known_values():
    one = np.array([1.0])
    assert R.polygamma(0, one)[0] == pytest.approx(-0.5772156649015329, abs=1e-12)  # -Euler-Mascheroni
    assert R.polygamma(1, one)[0] == pytest.approx(math.pi ** 2 / 6, abs=1e-12)
    assert R.polygamma(2, one)[0] == pytest.approx(-2 * 1.2020569031595942, abs=1e-12)  # -2 zeta(3)


def test_normalize_and_entropy_known_answers():
    np.testing.assert_allclose(R.normalize([0, math.log(3)]), [-1.3863, -0.2877], atol=1e-4)
    assert R.normalize([0, -20])[1] == pytest.approx(-18.4207, abs=1e-4)  # below the floor: ln(eps)
    h, v = R.ent(np.log(np.full(7, 1 / 7)))
    assert (h, v) == (pytest.approx(math.log(7)), pytest.approx(0, abs=1e-12))
    h, v = R.ent(np.log([0.9, 0.1]))
    assert (h, v) == (pytest.approx(0.3251, abs=1e-4), pytest.approx(0.4345, abs=1e-4))
    th, tv = D.ent(t32([np.log([0.9, 0.1])]))
    assert (float(th), float(tv)) == (pytest.approx(0.3251, abs=1e-4), pytest.approx(0.4345, abs=1e-4))


def test_mixing_weights_known_answers():
    assert C.emwa_logp_base ** (-C.emwa_logp_exp_factor / 1.0) == pytest.approx(4 ** -3)  # gamma(KL_m = 1)
    assert 1 - C.perturb_base_coeff ** (-C.perturb_exp_coeff / 1.0) == pytest.approx(0.9)  # rho(KL_pi = 1)


# -- Dirichlet ------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [(2.0, 3.0, 5.0), (10.0, 1.0, 0.1, 0.1)])
def test_fit_recovers_known_parameters(alpha):
    t = expected_log(alpha)  # E[ln p_i] under Dir(alpha): the MLE of data with these means is alpha
    np.testing.assert_allclose(R.fit_dirichlet(t), alpha, atol=1e-3)
    np.testing.assert_allclose(D.fit_dirichlet(t32([t]), 140)[0].numpy(), alpha, rtol=2e-3, atol=2e-3)


def test_fit_of_uniform_target_stays_exactly_one():
    t = expected_log([1.0, 1.0, 1.0])
    assert R.fit_dirichlet(t).tolist() == [1.0, 1.0, 1.0]
    assert D.fit_dirichlet(t32([t]), 140)[0].tolist() == [1.0, 1.0, 1.0]


def test_fit_of_one_distribution_keeps_its_shape():
    # no finite MLE: alpha grows, its mean is p
    a = R.fit_dirichlet(np.log([0.7, 0.2, 0.1]))
    np.testing.assert_allclose(a / a.sum(), [0.7, 0.2, 0.1], atol=1e-4)
    assert a.sum() > 1e5


def test_warm_refit_reaches_the_same_root():
    start, target = np.array([2.0, 3.0, 5.0]), np.array([2.5, 3.0, 4.5])
    a = R.fit_dirichlet(expected_log(target), 6, start=start)
    np.testing.assert_allclose(a, target, atol=1e-3)
    ta = D.fit_dirichlet(t32([expected_log(target)]), 6, start=t32([start]))
    np.testing.assert_allclose(ta[0].numpy(), target, rtol=2e-3)


def test_log_density_of_dir22_at_half_is_ln_1_5():
    q = np.log([0.5, 0.5])
    assert R.log_dirichlet(q, [2, 2]) == pytest.approx(math.log(1.5), abs=1e-12)
    assert float(D.log_dirichlet(t32([q]), t32([[2, 2]]))[0]) == pytest.approx(math.log(1.5), abs=1e-5)


def test_gamma_draws_have_the_gamma_distribution():
    rng = np.random.default_rng(3)
    n = 20000
    for a in (0.3, 1.0, 4.0):
        u = rng.random((n, R.UNIFORMS_PER_GAMMA))
        g = D.gamma_draw(torch.full((1, n), a), t32(u)[None]).double().numpy()[0]
        # Kolmogorov-Smirnov against Gamma(a, 1): the draws must not be told apart at 1%
        assert stats.kstest(g, stats.gamma(a).cdf).pvalue > 0.01
        ref = R.gamma_draw(np.full(200, a), u[:200])
        np.testing.assert_allclose(g[:200], ref, rtol=2e-4, atol=1e-6)


# -- temperature solve -----------------------------------------------------------------------------

def test_temp_solve_hits_reachable_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6)) * 2
    targets = np.array([0.3, 0.8, 1.2, 1.5, 1.7])  # all below ln 6 = 1.79 and above the reach of T = 2^-10
    for x, tau in zip(logits, targets):
        T, ok = R.temp_solve(x, tau)
        assert ok
        assert abs(R.ent(R.normalize(x / T, -np.inf))[0] - tau) < 1e-4
    T = D.temp_solve(t32(logits), t32(targets), 10).double().numpy()
    for x, tau, t in zip(logits, targets, T):
        assert abs(R.ent(R.normalize(x / t, -np.inf))[0] - tau) < 1e-4
    # T increases with the target entropy
    Tsame = [R.temp_solve(logits[0], tau)[0] for tau in targets]
    assert all(a < b for a, b in zip(Tsame, Tsame[1:]))


def test_temp_solve_of_own_entropy_is_one_and_unreachable_is_reported():
    x = np.array([3.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    h = R.ent(R.normalize(x, -np.inf))[0]
    assert R.temp_solve(x, h) == (1.0, True)
    T, ok = R.temp_solve(x, math.log(6) + 0.1)  # above the uniform distribution's entropy
    assert not ok
    assert R.T_MIN <= T <= R.T_MAX


def test_entropy_derivatives_match_finite_differences():
    x = np.array([2.0, 1.0, 0.3, -0.5, -2.0])

    def H(T):
        return R.ent(R.normalize(x / T, -np.inf))[0]

    T, h = 0.8, 1e-4
    y = R.normalize(x / T, -np.inf)
    p = np.exp(y)
    c = y + R.ent(y)[0]
    mu2, mu3 = np.sum(p * c * c), np.sum(p * c ** 3)
    assert mu2 / T == pytest.approx((H(T + h) - H(T - h)) / (2 * h), rel=1e-5)
    assert -(mu3 + 3 * mu2) / T ** 2 == pytest.approx((H(T + h) - 2 * H(T) + H(T - h)) / h ** 2, rel=1e-3)


# -- the decision and the state ------------------------------------------------------------------

def _row(logits):
    logits = np.asarray(logits, dtype=np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    order = np.argsort(-logp, kind="stable")
    p = np.exp(logp)
    h = -np.sum(p * logp)
    return order, logp[order], h, float(np.sum(p * (logp + h) ** 2))


def test_peaked_distribution_gives_argmax_for_every_key():
    cfg = dataclasses.replace(DSliderConfig(support=8), outlier_bias=-1e9)  # outlier test disabled
    pol = DSlider(cfg)
    order, top, H, V = _row([20.0] + [0.0] * 15)
    top = top[:8]
    s = R.init_state(cfg, top, H, V)
    ts = D.init_state(cfg, t32([top]), t32([H]), t32([V]))
    rng = np.random.default_rng(1)
    for _ in range(20):
        u = rng.random(pol.draws)
        pos, code, _, _ = R.step(cfg, s, top, H, V, u)
        tp, tc, _, _ = D.dslider_step(cfg, ts, t32([top]), t32([H]), t32([V]), t32([u]))
        assert (order[pos], code) == (0, R.ARGMAX)
        assert (int(tp[0]), int(tc[0])) == (0, R.ARGMAX)


def test_state_on_a_constant_input_converges_to_it():
    cfg = DSliderConfig(support=16)
    pol = DSlider(cfg)
    rng = np.random.default_rng(2)
    order, top, H, V = _row(rng.normal(size=40) * 2)
    top = top[:16]
    Hk = R.ent(R.normalize(top[:cfg.outlier_topk], cfg.noise_floor))[0]
    s = R.init_state(cfg, top, H, V)
    s.update(ent_n=H + 3.0, varent_n=V + 2.0, topk_ent=Hk - 1.0)  # start away from the input
    ts = {k: t32([v]) for k, v in s.items()}
    for n in range(1, 11):
        u = rng.random(pol.draws)
        _, _, s, _ = R.step(cfg, s, top, H, V, u)
        _, _, ts, _ = D.dslider_step(cfg, ts, t32([top]), t32([H]), t32([V]), t32([u]))
        # EMA with c = 0.7: the gap shrinks by (1 - c) per step
        assert s["ent_n"] - H == pytest.approx(3.0 * 0.3 ** n, rel=1e-6)
    assert abs(s["ent_n"] - H) < 1e-4 and abs(s["varent_n"] - V) < 1e-4 and abs(s["topk_ent"] - Hk) < 1e-4
    assert abs(float(ts["ent_n"][0]) - H) < 1e-4 and abs(float(ts["varent_n"][0]) - V) < 1e-4
    assert abs(float(ts["topk_ent"][0]) - Hk) < 1e-4


def _random_state(cfg, rng, B):
    """A non-degenerate state: alpha moderate, m its expected log-probabilities."""
    alpha = rng.uniform(0.5, 5, size=(B, cfg.support))
    s = {"alpha": alpha, "m": np.stack([expected_log(a) for a in alpha])}
    for name, per_pos in R.STATE_FIELDS:
        if not per_pos:
            s[name] = rng.uniform(0.1, 3, size=B)
    s["dir_ent"] = rng.uniform(-100, 10, size=B)
    return s


def test_device_step_matches_the_reference():
    cfg = DSliderConfig(support=16, outlier_bias=-12.0)  # a bias that lets every branch happen
    pol = DSlider(cfg)
    rng = np.random.default_rng(5)
    B = 24
    s = _random_state(cfg, rng, B)
    for name, per_pos in R.STATE_FIELDS:  # calm rows (even) are inliers, the others outliers
        if not per_pos and name != "dir_ent":
            s[name][::2] *= 0.05
    rows = [_row(rng.normal(size=64) * (rng.uniform(1, 2) if b % 2 else rng.uniform(2, 8))) for b in range(B)]
    top = np.stack([r[1][:16] for r in rows])
    H, V = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    u = rng.random((B, pol.draws))
    tp, tc, tn, te = D.dslider_step(cfg, {k: t32(v) for k, v in s.items()}, t32(top), t32(H), t32(V), t32(u))
    seen = set()
    for b in range(B):
        sb = {k: (v[b] if np.ndim(v) == 2 else float(v[b])) for k, v in s.items()}
        pos, code, new, info = R.step(cfg, sb, top[b], H[b], V[b], u[b])
        seen.add(code)
        assert (int(tp[b]), int(tc[b])) == (pos, code)
        for k in ("ent_n", "tce_n", "tcv_n", "tce_s", "temp", "topk_ent"):
            assert float(tn[k][b]) == pytest.approx(new[k], rel=1e-3, abs=1e-3), k
        np.testing.assert_allclose(tn["alpha"][b].numpy(), new["alpha"], rtol=1e-2)
        assert float(te["dslider_score"][b]) == pytest.approx(info["score"], rel=1e-4, abs=1e-4)
    assert len(seen) >= 3  # the comparison covered most branches


def test_no_nan_in_10000_random_steps():
    """A property test: 100 rows x 100 steps of random logits (scales from flat to one-hot, some
    with -inf); every state field and output stays finite,
    each row takes exactly one branch, rho in [0, 1] and T within its bounds."""
    cfg = DSliderConfig(support=32)
    pol = DSlider(cfg)
    g = torch.Generator().manual_seed(0)
    B, V = 100, 300
    s = None
    for t in range(100):
        scale = torch.rand(B, 1, generator=g) * 30
        logits = torch.randn(B, V, generator=g) * scale
        logits[:, :5] = logits[:, :5].masked_fill(torch.rand(B, 5, generator=g) < 0.1, float("-inf"))
        logp = logits.log_softmax(-1)
        p = logp.exp()
        H = -(p * logp.clamp_min(-1e4)).sum(-1)
        Vv = (p * (logp.clamp_min(-1e4) + H[:, None]) ** 2).sum(-1)
        top, _ = logp.topk(cfg.support, -1)
        if s is None:
            s = D.init_state(cfg, top, H, Vv)
        pos, code, s, ex = D.dslider_step(cfg, s, top, H, Vv, torch.rand(B, pol.draws, generator=g))
        for k, v in list(s.items()) + list(ex.items()):
            assert torch.isfinite(v).all(), (t, k)
        assert ((code >= 0) & (code < 4)).all() and ((pos >= 0) & (pos < cfg.support)).all()
        assert ((ex["dslider_rho"] >= 0) & (ex["dslider_rho"] <= 1)).all()  # 1 - 10^(-1/KL) rounds to 1 as KL -> 0
        assert ((ex["dslider_temp"] >= R.T_MIN) & (ex["dslider_temp"] <= R.T_MAX)).all()


# -- per-row state in the backend, through the engine -----------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


PROMPTS = [[72, 105], [84, 104, 101, 32, 99, 97, 116], [65] * 9]


def _texts(tiny, prompts, seeds, policy, n=1):
    out = {}
    reqs = [Request(prompt=p, policy=policy, max_tokens=12, seed=s, n=n) for p, s in zip(prompts, seeds)]
    for rec in generate(tiny.engine(), reqs):
        out.setdefault((rec.request_id, rec.choice), []).append(rec)
    return [[[r.token for r in out[(q.id, c)]] for c in range(n)] for q in reqs], out


def test_same_seed_same_tokens_alone_or_in_a_batch(tiny):
    pol = catalog.resolve("dslider", tiny).policy
    together, recs = _texts(tiny, PROMPTS, [1, 2, 3], pol)
    alone = [_texts(tiny, [p], [s], pol)[0][0] for p, s in zip(PROMPTS, [1, 2, 3])]
    assert together == alone
    reversed_ = _texts(tiny, PROMPTS[::-1], [3, 2, 1], pol)[0]
    assert reversed_[::-1] == together  # permuting the batch permutes the outputs
    r = next(iter(recs.values()))[0]
    assert r.state in R.DSLIDER_STATES
    assert set(R.EXTRA_KEYS) <= set(r.to_dict())


def test_rows_keep_their_own_state_when_the_batch_changes(tiny):
    pol = catalog.resolve("dslider", tiny).policy
    ref = _texts(tiny, [PROMPTS[1]], [5], pol)[0][0]
    eng = tiny.engine()
    short = Request(prompt=PROMPTS[0], policy=pol, max_tokens=3, seed=9)
    long = Request(prompt=PROMPTS[1], policy=pol, max_tokens=12, seed=5)
    eng.add([short, long])
    got = []
    for step in range(12):  # the short row leaves after 3 steps; a new one joins at step 5
        if step == 5:
            eng.add([Request(prompt=PROMPTS[2], policy=pol, max_tokens=4, seed=4)])
        got += [r.token for r in eng.step() if r.request_id == long.id]
    assert [got] == ref


def test_state_store_forks_with_rows():
    store = D.DSliderStates()
    pol = DSlider(DSliderConfig(support=8))
    top = torch.log_softmax(torch.randn(3, 8), -1).sort(-1, descending=True).values
    H = torch.rand(3)
    store.step(pol, 3, [0, 1, 2], top, torch.arange(24).view(3, 8), H, H, torch.rand(3, pol.draws))
    s_before = {k: v.clone() for k, v in store._by_config[pol.config][0].items()}
    store.select([2, 0, 0])
    store.add_rows(1)
    s, ready = store._by_config[pol.config]
    assert ready == [True, True, True, False]
    for k, v in s.items():
        assert torch.equal(v[:3], s_before[k][[2, 0, 0]]) and not v[3].any()


def test_other_backends_get_a_clear_error(tiny):
    class OtherBackend:
        name, vocab_size, rows = "jax", 256, 0

    eng = Engine(OtherBackend(), tiny.tokenizer, 512)
    with pytest.raises(EntropixError, match="dslider sampler runs on the torch backend only, not jax"):
        eng.validate(Request(prompt=[1, 2], policy=DSlider()))


# -- the config ----------------------------------------------------------------------------------

def test_config_defaults_are_the_spec_s():
    c = DSliderConfig()
    assert (c.emwa_ent_naked_coeff, c.token_cross_var_scaffold_coeff, c.emwa_logp_base, c.perturb_base_coeff) == (0.7, 0.75, 4, 10)
    assert c.outlier_bilinear == ((1.3,) * 4,) * 4 and c.target_entropy_temp == 8 and c.outlier_topk == 6
    assert (c.argmax_threshold, c.dirichlet_threshold, c.fit_iters, c.temp_iters) == ((0.1, 1.2), (0.1, 1.2), 140, 10)


def test_config_from_json(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"support": 32, "argmax_threshold": [0.2, 1.0], "_note": "metadata"}))
    c = DSliderConfig.from_json(p)
    assert c.support == 32 and c.argmax_threshold == (0.2, 1.0)
    assert DSliderConfig.from_dict(c.to_dict()) == c
    dec = catalog.resolve("dslider", None, sampler_config=str(p))
    assert dec.policy.config == c
    for bad, needle in (({"support": 1}, "support"), ({"nope": 1}, "unknown key"), ({"outlier_topk": 99}, "exceed"),
                        ({"target_entropy": [1, 2]}, "shape"), ({"emwa_temp_coeff": 2}, "emwa_temp_coeff")):
        p.write_text(json.dumps(bad))
        with pytest.raises(EntropixError, match=needle):
            DSliderConfig.from_json(p)


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    return write_hf_model(tmp_path_factory.mktemp("ds") / "tiny", gguf_path)


def test_generate_dslider_seed_json_reproducible(tiny_hf, cli_load_once, capsys):
    args = ["generate", "Tell me a fact about cats.", "--model", str(tiny_hf), "--sampler", "dslider", "--json",
            "--max-tokens", "16", "--seed", "1"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main(args[:-1] + [seed]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[0]["records"] == runs[1]["records"]
    assert runs[0]["tokens"] != runs[2]["tokens"]
    assert all(r["state"] in R.DSLIDER_STATES and "dslider_temp" in r for r in runs[0]["records"])


# -- the server ------------------------------------------------------------------------------------

def test_server_offers_dslider_and_lookahead():
    import httpx
    import torch as _torch

    from entropix.serve import ServerThread, create_app

    lm = tiny_lm(max_position_embeddings=1024)
    with _torch.no_grad():  # ASCII only, never the end of text (as the server tests' model)
        lm.model.lm_head.weight[128:] = 0
        lm.model.lm_head.weight[0] = 0
    with ServerThread(create_app(lm, max_rows=8, max_n=4)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        specs = {s["name"]: s for s in c.get("/v1/entropix/info").json()["sampler_specs"]}
        assert specs["dslider"]["states"] == list(R.DSLIDER_STATES) and "lookahead" in specs
        bodies = []
        for name, extra in (("dslider", {"seed": 1}), ("dslider", {"seed": 1}),
                            ("dslider", {"seed": 1, "sampler_config": {"support": 16}}), ("lookahead", {})):
            r = c.post("/v1/completions", json={"model": lm.name, "prompt": "Once", "max_tokens": 5, "sampler": name,
                                                "metrics": True, **extra})
            assert r.status_code == 200, r.text
            bodies.append(r.json()["choices"][0])
        assert bodies[0]["text"] == bodies[1]["text"]
        assert all(m["state"] in R.DSLIDER_STATES and "dslider_temp" in m for m in bodies[2]["entropix"])
        assert all(m["state"] in ("calm", "search") and m["lookahead_forwards"] >= 1 for m in bodies[3]["entropix"])
        r = c.post("/v1/completions", json={"model": lm.name, "prompt": "Once", "max_tokens": 2, "sampler": "dslider",
                                            "sampler_config": {"support": 1}})
        assert r.status_code == 400 and "support" in r.text

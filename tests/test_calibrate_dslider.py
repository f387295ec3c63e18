"""`calibrate` for DSlider and lookahead: the probe follows the greedy text, the biases sit at their
quantiles (so the branch shares are what the calibration says), and the command writes profiles
that the samplers load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from entropix import EntropixError
from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.evaluate import calibrate_dslider as C
from entropix.evaluate import dslider_onpolicy as O
from entropix.evaluate.calibrate import collect_metrics
from entropix.sampler.dslider import DSLIDER_STATES, PROFILE_DIR, DSlider, DSliderConfig, load_dslider_profile
from entropix.sampler.lookahead import Lookahead
from entropix.sampler.policy import Greedy

from tinymodel import tiny_lm

PROMPTS = ["Hi", "The cat", "Once upon a time", "2+2=", "Why?", "Name a colour."]
BASE = DSliderConfig(support=16)


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


@pytest.fixture(scope="module")
def metrics(tiny):
    return C.collect_dslider(tiny, PROMPTS, BASE, max_tokens=24, batch_size=4)


def _tokens(tiny, policy, max_tokens=24):
    reqs = [Request(tiny.tokenizer.encode_chat([{"role": "user", "content": p}]), policy, max_tokens=max_tokens,
                    seed=7, stop_ids=tiny.tokenizer.stop_ids) for p in PROMPTS]
    out = {r.id: [] for r in reqs}
    for rec in generate(tiny.engine(), reqs):
        out[rec.request_id].append(rec)
    return [out[r.id] for r in reqs]


def test_probe_follows_the_greedy_text(tiny, metrics):
    probe = [[r.token for r in recs] for recs in _tokens(tiny, DSlider(C.probe_config(BASE)))]
    greedy = [[r.token for r in recs] for recs in _tokens(tiny, Greedy())]
    assert probe == greedy
    assert metrics["score"].size == sum(map(len, greedy))


def test_raw_scores_do_not_depend_on_the_base_bias(tiny, metrics):
    shifted = C.collect_dslider(tiny, PROMPTS, dataclasses.replace(BASE, outlier_bias=-3.0), max_tokens=24, batch_size=4)
    np.testing.assert_allclose(shifted["score"], metrics["score"], atol=0.02)  # fp32 at 1e5: ulp 2^-7


def test_spec_defaults_make_every_token_an_outlier(metrics):
    """Spec bug 6: every weight and input of the outlier test is >= 0, so with bias 0 all score > 0."""
    assert (metrics["score"] > 0).all()
    codes = C.branch_codes(BASE, metrics)
    assert set(np.unique(codes)) <= {2, 3}  # dirichlet, ood


def test_calibrated_biases_sit_at_their_quantiles(metrics):
    cfg = C.dslider_thresholds(BASE, metrics)
    n = metrics["score"].size
    codes = C.branch_codes(cfg, metrics)
    outlier = codes >= 2
    # a quantile cut: the share above it is 1 - q up to ties and one token
    assert abs(outlier.mean() - (1 - C.OUTLIER_QUANTILE)) <= 1.5 / n
    assert abs((codes == 2).sum() - (codes == 3).sum()) <= 2  # the median splits the outliers in two
    assert cfg.argmax_threshold == BASE.argmax_threshold  # (the random model's top-k is too flat for argmax)
    assert cfg.support == BASE.support and cfg.outlier_topk == BASE.outlier_topk


def test_calibrated_profile_decodes_with_every_kind_of_branch(tiny):
    cfg, stats = C.calibrate_dslider(tiny, PROMPTS, max_tokens=24, batch_size=6, base=BASE, policy="greedy")
    assert "on_policy" not in stats
    assert set(stats["regime_shares"]) == set(DSLIDER_STATES)
    assert stats["regime_shares_base"]["argmax"] + stats["regime_shares_base"]["inlier"] == 0
    states = {r.state for recs in _tokens(tiny, DSlider(cfg)) for r in recs}
    assert states & {"argmax", "inlier"}  # the default never takes them (all outliers)
    assert {r.state for recs in _tokens(tiny, DSlider(BASE)) for r in recs} <= {"dirichlet", "ood"}


def test_lookahead_min_entropy_is_the_entropy_quantile(tiny):
    cfg, stats = C.calibrate_lookahead(tiny, PROMPTS, max_tokens=24, batch_size=4, base=Lookahead(candidates=3))
    H = collect_metrics(tiny, PROMPTS, 24, 4, ())["entropy"]  # greedy entropies, bits
    assert cfg.min_entropy == pytest.approx(np.quantile(H, C.LOOKAHEAD_QUANTILE), abs=1e-4)
    assert cfg.candidates == 3 and stats["tokens"] == H.size
    assert abs(stats["search_share"] - (1 - C.LOOKAHEAD_QUANTILE)) <= 1.5 / H.size


def test_too_few_tokens_is_a_clear_error(tiny):
    with pytest.raises(EntropixError, match="only"):
        C.calibrate_dslider(tiny, PROMPTS[:1], max_tokens=2, base=BASE)
    with pytest.raises(EntropixError, match="max-tokens"):
        C.collect_dslider(tiny, PROMPTS, BASE, max_tokens=0)


def test_builtin_dslider_profile_is_picked_by_model_name():
    smol = load_dslider_profile("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert smol.outlier_bias < 0 and smol.dirichlet_threshold != DSliderConfig().dirichlet_threshold
    assert load_dslider_profile("tiny") == DSliderConfig()  # no profile: the spec's defaults


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    from tiny import write_hf_model

    return write_hf_model(tmp_path_factory.mktemp("cal") / "tiny", gguf_path)


@pytest.mark.slow
def test_cli_calibrate_dslider_and_lookahead(tiny_hf, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"support": 16}))
    out = tmp_path / "d.json"
    args = ["calibrate", "--model", str(tiny_hf), "--prompts", str(prompts), "-n", "12"]
    assert main(args + ["--sampler", "dslider", "--base", str(base), "-o", str(out)]) == 0, capsys.readouterr().err
    cfg = DSliderConfig.from_json(out)
    assert cfg.support == 16 and cfg.outlier_bias < 0 and json.loads(out.read_text())["_calibration"]["prompts"] == 6
    on = json.loads(out.read_text())["_calibration"]["on_policy"]
    assert on["on_policy"]["outlier_share"] <= on["aim"] and not on["on_policy"]["locked_in"]
    assert main(args + ["--sampler", "dslider", "--base", str(base), "--policy", "greedy", "-o", str(out)]) == 0
    assert "on_policy" not in json.loads(out.read_text())["_calibration"]
    assert main(args + ["--sampler", "lookahead", "--policy", "greedy"]) == 2
    assert "--policy, --target and --seed take --sampler dslider" in capsys.readouterr().err
    out2 = tmp_path / "l.json"
    assert main(args + ["--sampler", "lookahead", "-o", str(out2)]) == 0, capsys.readouterr().err
    la = Lookahead.from_json(out2)
    assert la.min_entropy == json.loads(out2.read_text())["min_entropy"] and la.candidates == Lookahead().candidates
    base.write_text(json.dumps({"nonsense": 1}))
    assert main(args + ["--sampler", "dslider", "--base", str(base)]) == 2
    assert "unknown key" in capsys.readouterr().err


# -- on-policy calibration (dslider_onpolicy.py) ------------------------------------------------------


def test_lock_in_is_a_long_run_or_a_mostly_outlier_row():
    A, D, X = 0, 2, 3  # argmax, dirichlet, ood
    assert O.longest_run(np.array([1, 1, 0, 1, 1, 1, 0], bool)) == 3 and O.longest_run(np.zeros(4, bool)) == 0
    run = np.array([A] * 30 + [D, X] * 8 + [D] + [A] * 30)  # 17 in a row, 17 of 77 tokens
    assert O.locked_in(run) and not O.locked_in(run[1:-1][np.arange(75) != 40])  # 16 in a row is not
    mostly = np.array([D, D, A] * 10)  # runs of 2, but 67% of 30 tokens
    assert O.locked_in(mostly) and not O.locked_in(mostly[:15])  # too short to judge a share
    s = O.summarize([run, mostly, np.array([A, A])])
    assert s["locked_in"] == [0, 1] and s["tokens"] == 109 and s["per_row_longest_run"] == [17, 2, 0]
    assert s["outlier_share"] == pytest.approx((17 + 20) / 109, abs=1e-4)
    with pytest.raises(EntropixError, match="no tokens"):
        O.summarize([np.zeros(0, np.int64)])


def _bernoulli_decoder(share_at, rows=84, tokens=64, seed=0):
    """A fake decode: rows of iid tokens, an outlier ("ood") with probability share_at(t)."""
    def measure(t):
        rng = np.random.default_rng([seed, int(round(t * 1e4))])  # reproducible per point, as the real seeds
        p = float(np.clip(share_at(t), 0, 1))
        return O.summarize([np.where(rng.random(tokens) < p, 3, 0) for _ in range(rows)])
    return measure


@pytest.mark.parametrize("seed", range(6))
def test_search_finds_the_boundary_of_a_noisy_monotone_share(seed):
    """share(t) = 0.9 - t/100 with binomial noise (sd 0.006 over 5376 tokens): the aim 0.25 is crossed at
    t = 65; the bisection stops within step/16 of the first passing point it brackets."""
    history: list = []

    def measure(t):
        s = _bernoulli_decoder(lambda x: 0.9 - x / 100, seed=seed)(t)
        history.append(t)
        return s

    t, s = O.search(measure, start=20.0, step=10.0, aim=0.25, history=history)
    assert t is not None and O.passes(s, 0.25) and s["outlier_share"] <= 0.25
    assert abs(t - 65) <= 2.0  # 3 sd of the noise in t (0.6) plus the tolerance (0.625)
    assert len(history) <= O.MAX_DECODES and all(x < t for x in history if x != t and x < 65 - 2.0)
    assert any(t - 10 / 16 - 1e-6 <= x < t for x in history)  # a failing point just below: it bisected


def test_search_gives_up_within_its_bound():
    history: list = []
    calls = []

    def measure(t):
        calls.append(t)
        history.append(t)
        return _bernoulli_decoder(lambda x: 0.5)(t)  # never below the aim

    t, s = O.search(measure, 0.0, 1.0, 0.25, history, max_decodes=5)
    assert t is None and len(calls) == 5 and calls == sorted(calls) and s["outlier_share"] > 0.25
    h2: list = []
    assert O.search(lambda x: (h2.append(x), _bernoulli_decoder(lambda y: 0.5)(x))[1], 0.0, 1.0, 0.25, h2,
                    upper=3.0)[0] is None and h2 == [0.0, 1.0, 2.0, 3.0]  # 1, 2, 4 clamped: stops at its end


def _fake_lm_decoder(monkeypatch, share):
    """decode_regimes replaced: rows whose outlier share is share(t, dirichlet bias)."""
    def decode(lm, prompts, cfg, max_tokens, batch_size, seed, draws):
        p = float(np.clip(share(-cfg.outlier_bias, cfg.dirichlet_threshold[1]), 0, 1))
        rng = np.random.default_rng([seed, int(1e4 * cfg.outlier_bias) % 2**32, int(1e4 * cfg.dirichlet_threshold[1]) % 2**32])
        return [np.where(rng.random(max_tokens) < p, 3, 0) for _ in range(len(prompts) * draws)]
    monkeypatch.setattr(O, "decode_regimes", decode)


def test_onpolicy_stage_one_moves_only_the_dirichlet_bias(monkeypatch):
    _fake_lm_decoder(monkeypatch, lambda t, b: 0.4 if b < 5 else 0.1)  # enough "dirichlet": passes at the start t
    start = DSliderConfig(outlier_bias=-50.0, dirichlet_threshold=(0.1, -10.0))
    cfg, st = O.calibrate_onpolicy(None, ["p"] * 42, start, 5.0, 30.0, max_tokens=64)
    assert cfg.outlier_bias == -50.0 and 5 <= cfg.dirichlet_threshold[1] <= 5 + 40 / 16 + 1e-3
    assert st["decodes"] <= O.MAX_DECODES and st["on_policy"]["outlier_share"] <= 0.25
    assert st["greedy_quantiles_on_policy"]["outlier_share"] > 0.3 and st["tokens_decoded"] == 64 * 84 * st["decodes"]


def test_onpolicy_stage_two_lowers_the_outlier_bias_or_fails_in_one_line(monkeypatch):
    _fake_lm_decoder(monkeypatch, lambda t, b: 0.9 - t / 100)  # the Dirichlet bias does not help
    start = DSliderConfig(outlier_bias=-50.0, dirichlet_threshold=(0.1, -10.0))
    cfg, st = O.calibrate_onpolicy(None, ["p"] * 42, start, 10.0, 30.0, max_tokens=64)
    assert cfg.dirichlet_threshold[1] == 30.0 and abs(-cfg.outlier_bias - 65) <= 2.0
    assert st["decodes"] <= O.MAX_DECODES and [h["dirichlet_bias"] for h in st["history"][:2]] == [-10.0, 30.0]
    _fake_lm_decoder(monkeypatch, lambda t, b: 0.6)
    with pytest.raises(EntropixError, match=r"^on-policy dslider calibration: .* after 12 decodes") as e:
        O.calibrate_onpolicy(None, ["p"] * 42, start, 10.0, 30.0, max_tokens=64)
    assert "\n" not in str(e.value)
    with pytest.raises(EntropixError, match="--target"):
        O.calibrate_onpolicy(None, ["p"], start, 10.0, 30.0, target=1.5)


def test_onpolicy_calibration_of_the_tiny_model(tiny):
    """Its own samples pass at the returned biases (the same seeds decode the same rows), and along stage 2
    the dirichlet+ood share falls as the outlier threshold rises (the premise of the bisection)."""
    cfg, st = C.calibrate_dslider(tiny, PROMPTS, max_tokens=24, batch_size=16, base=BASE)
    on = st["on_policy"]
    again = O.summarize(O.decode_regimes(tiny, PROMPTS, cfg, 24, 16, on["seed"], on["draws"]))
    assert again == on["on_policy"] and O.passes(again, on["aim"]) and on["decodes"] <= O.MAX_DECODES
    assert on["greedy_quantiles_on_policy"]["outlier_share"] > again["outlier_share"]
    stage2 = [(-h["outlier_bias"], h["outlier_share"]) for h in on["history"] if h["dirichlet_bias"] == cfg.dirichlet_threshold[1]]
    ts, shares = np.array(stage2).T
    assert len(ts) >= 4 and np.corrcoef(np.argsort(np.argsort(ts)), np.argsort(np.argsort(shares)))[0, 1] <= -0.9
    with pytest.raises(EntropixError, match="--policy"):
        C.calibrate_dslider(tiny, PROMPTS, max_tokens=24, base=BASE, policy="nope")


@pytest.fixture(scope="module")
def smol_auto():
    """The embedded model in the default weight mode (int4 blocks on the CPU): the shipped profile's."""
    from entropix.loading import load_model

    return load_model(None, device="cpu", progress=False, quant="auto")


@pytest.mark.slow
def test_shipped_profile_keeps_to_the_target_on_its_own_samples(smol_auto):
    """The shipped SmolLM2-135M profile sampling the 42 calibration prompts (64 tokens) with seeds it was not
    calibrated on (1000 + i, 2000 + i): at most 30% dirichlet+ood and no row locked in (the old greedy-only
    profile: 68% and 31 of 42 rows at seed 0)."""
    from entropix.evaluate.calibrate import load_prompts

    cfg = load_dslider_profile(smol_auto.name)
    assert cfg == DSliderConfig.from_json(PROFILE_DIR / "smollm2-135m.json")
    for seed in (1000, 2000):
        s = O.summarize(O.decode_regimes(smol_auto, load_prompts(), cfg, 64, 64, seed))
        assert s["outlier_share"] <= O.TARGET and s["locked_in"] == [], (seed, s["outlier_share"], s["locked_in"])

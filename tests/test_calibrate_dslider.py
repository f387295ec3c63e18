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
from entropix.evaluate.calibrate import collect_metrics
from entropix.sampler.dslider import DSLIDER_STATES, DSlider, DSliderConfig, load_dslider_profile
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
    cfg, stats = C.calibrate_dslider(tiny, PROMPTS, max_tokens=24, batch_size=6, base=BASE)
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
    out2 = tmp_path / "l.json"
    assert main(args + ["--sampler", "lookahead", "-o", str(out2)]) == 0, capsys.readouterr().err
    la = Lookahead.from_json(out2)
    assert la.min_entropy == json.loads(out2.read_text())["min_entropy"] and la.candidates == Lookahead().candidates
    base.write_text(json.dumps({"nonsense": 1}))
    assert main(args + ["--sampler", "dslider", "--base", str(base)]) == 2
    assert "unknown key" in capsys.readouterr().err

"""The entropix sampler: config and profiles, strategies, pause rule, reproducibility, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest

from entropix import EntropixError
from entropix.cli import main
from entropix.cli.common import regime_summary
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.sampler import catalog
from entropix.evaluate.calibrate import thresholds_from_metrics
from entropix.sampler.config import SamplerConfig, builtin_profiles, load_profile
from entropix.sampler.policy import ENTROPIX_STATES as STATES
from entropix.sampler.policy import Entropix

from tinymodel import tiny_lm

CFG = SamplerConfig(model="test", low_ent=1.0, low_vent=1.0, med_ent=3.0, high_ent=5.0, med_vent=4.0, high_vent=8.0)
QUESTION = "How many times does the letter r appear in strawberry?"


# -- config and profiles ------------------------------------------------------------------------

def test_defaults_are_the_v2_values_and_frozen():
    c = SamplerConfig()
    assert (c.temperature, c.top_p, c.top_k, c.min_p) == (0.666, 0.90, 27, 0.03)
    assert (c.low_ent, c.low_vent, c.med_ent, c.high_ent, c.high_vent) == (0.1, 0.1, 3.0, 5.0, 5.0)
    assert c.pause_text == " ..." and c.pause_budget >= 1 and c.max_temperature >= c.temperature
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("bad, words", [
    ({"temperature": 0}, "temperature"),
    ({"temperature": 3.0}, "temperature"),  # above max_temperature
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"low_ent": -1}, "low_ent"),
    ({"low_ent": 4.0}, "low_ent <= med_ent"),
    ({"high_vent": 0.05}, "low_vent <= high_vent"),
    ({"low_vent": 1.0, "med_vent": 0.5}, "low_vent <= med_vent"),
    ({"n_candidates": 0}, "n_candidates"),
    ({"pause_text": ""}, "pause_text"),
    ({"attention_layers": ()}, "attention_layers"),
    ({"max_temperature": float("nan")}, "max_temperature"),
])
def test_bad_values_give_one_line_errors(bad, words):
    with pytest.raises(EntropixError) as e:
        SamplerConfig(**bad)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_json_round_trip_and_metadata(tmp_path):
    c = dataclasses.replace(CFG, attention_layers=(-2, -1), pause_budget=3)
    path = tmp_path / "p.json"
    c.to_json(path, extra={"calibration": {"tokens": 5}})
    data = json.loads(path.read_text())
    assert data["_calibration"] == {"tokens": 5} and data["attention_layers"] == [-2, -1]
    assert SamplerConfig.from_json(path) == c


def test_bad_files_give_one_line_errors(tmp_path):
    cases = {
        "missing.json": None,
        "broken.json": "{\"low_ent\": 1,,}",
        "list.json": "[1, 2]",
        "typo.json": json.dumps({"low_entropy": 1.0}),
        "value.json": json.dumps({"top_p": "high"}),
    }
    expect = {"missing.json": "does not exist", "broken.json": "not valid JSON", "list.json": "JSON object",
              "typo.json": "unknown key(s) low_entropy", "value.json": "top_p must be a finite number"}
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(EntropixError) as e:
            SamplerConfig.from_json(p)
        msg = str(e.value)
        assert expect[name] in msg and name in msg and "\n" not in msg, msg


def test_builtin_profiles_load_and_are_picked_by_model_name():
    profiles = builtin_profiles()
    assert {"smollm2-135m", "llama-3.2-1b-instruct"} <= set(profiles)
    for p in profiles.values():
        SamplerConfig.from_json(p)
    smol = load_profile("smollm2-135m")
    assert smol.model == "smollm2-135m"
    assert (smol.low_ent, smol.high_ent, smol.high_vent) != (0.1, 5.0, 5.0)  # calibrated, not the Llama defaults
    assert load_profile("HuggingFaceTB/SmolLM2-135M-Instruct") == smol
    llama = load_profile("/models/Llama-3.2-1B-Instruct-Q8_0.gguf")
    assert llama.model == "llama-3.2-1b-instruct"
    assert (llama.low_ent, llama.low_vent, llama.med_ent, llama.high_ent, llama.high_vent) == (0.1, 0.1, 3.0, 5.0, 5.0)
    assert (llama.temperature, llama.top_p, llama.top_k, llama.min_p) == (0.666, 0.9, 27, 0.03)


def test_unknown_model_gets_defaults_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="entropix"):
        c = load_profile("Qwen2.5-0.5B-Instruct")
    assert c == SamplerConfig()
    assert any("not calibrated" in r.getMessage() or "no calibrated profile" in r.getMessage() for r in caplog.records)


def test_calibration_thresholds_come_from_quantiles():
    g = np.random.default_rng(0)
    H = g.random(10_000) * 10  # uniform on [0, 10]
    V = H * 2 + g.random(10_000) * 4  # correlated, as in real models
    t = thresholds_from_metrics(H, V)
    assert t["low_ent"] == pytest.approx(3.0, abs=0.15)  # 30th percentile of H
    assert t["med_ent"] == pytest.approx(7.0, abs=0.15)
    assert t["high_ent"] == pytest.approx(9.0, abs=0.15)
    assert t["low_vent"] == pytest.approx(float(np.quantile(V, 0.3)), abs=1e-3)
    assert t["high_vent"] == pytest.approx(float(np.quantile(V, 0.8)), abs=1e-3)
    assert t["low_vent"] <= t["med_vent"]
    # med_vent is a quantile among the most uncertain tokens, so treading is reachable
    assert ((H >= t["high_ent"]) & (V < t["med_vent"])).any()
    SamplerConfig(**t)  # consistent ordering


# -- through the engine on the embedded model -------------------------------------------------------

@pytest.mark.slow
def test_catalogue_uses_the_model_profile_and_tokenizer(smol, tmp_path):
    dec = catalog.resolve("entropix", smol, branches=10)  # options it does not take are ignored
    p = dec.policy
    assert isinstance(p, Entropix) and p.needs_attention and p.regimes == STATES
    assert p.config.model == "smollm2-135m"
    assert p.pause_id == smol.tokenizer.find_token(" ...") and smol.tokenizer.token_text(p.pause_id) == " ..."
    path = tmp_path / "p.json"
    dataclasses.replace(CFG, pause_text=" ...").to_json(path)
    p2 = catalog.resolve("entropix", smol, sampler_config=str(path), temperature=0.5).policy
    assert p2.config.low_ent == CFG.low_ent and p2.config.temperature == 0.5
    with pytest.raises(EntropixError):
        catalog.resolve("entropix", smol, sampler_config=str(tmp_path / "nope.json"))


# thresholds inside the tiny random model's entropy (6-7.3 bits) and varentropy (1.9-6.6): states vary
TINY_CFG = SamplerConfig(model="tiny", low_ent=6.8, low_vent=2.4, med_ent=6.95, high_ent=7.05, med_vent=2.9,
                         high_vent=3.5)
PROMPTS = [QUESTION, "Name a colour.", "Write a short poem about the sea at night.", "What is 7 times 8?"]


def _run(lm, prompts, seeds, max_tokens=24, policy=None):
    p = policy or catalog.resolve("entropix", lm).policy
    tok = lm.tokenizer
    reqs = [Request(tok.encode_chat([{"role": "user", "content": q}]), p, max_tokens=max_tokens, seed=sd,
                    stop_ids=tok.stop_ids, id=f"r{i}") for i, (q, sd) in enumerate(zip(prompts, seeds))]
    out: dict[str, list] = {}
    for r in generate(lm.engine(), reqs):
        out.setdefault(r.request_id, []).append(r)
    return out


def _batch_equals_alone(lm, policy, max_tokens) -> set[str]:
    """Four chat prompts decoded together and each alone: the same tokens, states and attention metrics."""
    seeds = [100, 101, 102, 103]
    batched = _run(lm, PROMPTS, seeds, max_tokens, policy)
    states = set()
    for i, (p, sd) in enumerate(zip(PROMPTS, seeds)):
        alone = _run(lm, [p], [sd], max_tokens, policy)["r0"]
        got = batched[f"r{i}"]
        assert [(r.token, r.state) for r in alone] == [(r.token, r.state) for r in got], p
        for a, b in zip(alone, got):
            for k in a.attn:
                assert a.attn[k] == pytest.approx(b.attn[k], abs=1e-3, rel=1e-3)
        states |= {r.state for r in got}
    return states


def test_batch_of_four_rows_equals_each_row_alone():
    lm = tiny_lm()
    states = _batch_equals_alone(lm, Entropix(TINY_CFG, lm.tokenizer.find_token(TINY_CFG.pause_text)), 24)
    assert len(states) >= 3


def test_same_seed_same_output():
    lm = tiny_lm()
    p = Entropix(TINY_CFG, lm.tokenizer.find_token(TINY_CFG.pause_text))
    a = _run(lm, [QUESTION], [5], policy=p)["r0"]
    b = _run(lm, [QUESTION], [5], policy=p)["r0"]
    assert [(r.token, r.state) for r in a] == [(r.token, r.state) for r in b]
    assert len({r.state for r in a}) >= 2


@pytest.mark.slow
def test_embedded_model_same_seed_same_output_and_batch_equals_alone(smol):
    """A smoke test of a few tokens with the model's own profile (the claims at length: the two tests above)."""
    a = _run(smol, [QUESTION], [5], max_tokens=6)["r0"]
    b = _run(smol, [QUESTION], [5], max_tokens=6)["r0"]
    assert [(r.token, r.state) for r in a] == [(r.token, r.state) for r in b]
    _batch_equals_alone(smol, catalog.resolve("entropix", smol).policy, 4)


@pytest.mark.slow
def test_cli_generate_json_shows_metrics_and_several_strategies(cli_load_once, capsys):
    rc = main(["generate", "--sampler", "entropix", "--seed", "11", "--json", QUESTION])
    out = capsys.readouterr().out
    assert rc == 0
    run = json.loads(out)
    recs = run["records"]
    assert recs and run["sampler"] == "entropix"
    for r in recs:
        for k in ("entropy", "varentropy", "margin", "attn_entropy", "attn_entropy_var", "agreement", "interaction"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), k
        assert r["state"] in STATES
    assert len({r["state"] for r in recs}) >= 2


@pytest.mark.slow
def test_cli_generate_prints_legend_and_summary_to_stderr(cli_load_once, capsys):
    rc = main(["generate", "--sampler", "entropix", "--seed", "11", "--max-tokens", "12", QUESTION])
    cap = capsys.readouterr()
    assert rc == 0
    assert "legend:" in cap.err and "regimes:" in cap.err and "flowing" in cap.err
    assert "legend:" not in cap.out and cap.out.strip()


def test_summary_counts_each_strategy():
    recs = [{"state": "flowing"}] * 3 + [{"state": "pause"}]
    text = regime_summary(recs, STATES, colour=False)
    assert "flowing 3 (75%)" in text and "pause 1 (25%)" in text
    assert all(st in text for st in STATES)  # the legend names every strategy
    assert "\033[" in regime_summary(recs, STATES, colour=True)


@pytest.mark.slow
def test_cli_calibrate_writes_a_loadable_profile(cli_load_once, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in [QUESTION, "Name a colour.", "Why is the sky blue?"]))
    out = tmp_path / "profile.json"
    rc = main(["calibrate", "--prompts", str(prompts), "--max-tokens", "12", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = SamplerConfig.from_json(out)
    data = json.loads(out.read_text())
    assert cfg.model == "smollm2-135m" and data["_calibration"]["prompts"] == 3
    assert cfg.low_ent <= cfg.med_ent <= cfg.high_ent and cfg.low_vent <= min(cfg.med_vent, cfg.high_vent)
    assert main(["calibrate", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err

"""The entropix sampler: config and profiles, strategies, pause rule, reproducibility, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field

import pytest
import torch

from entropix import EntropixError
from entropix.cli import main
from entropix.entropix import (ADAPTIVE, BRANCH, FLOWING, PAUSE, RESAMPLE, STATES, TREADING, EntropixSampler,
                               SamplerConfig, builtin_profiles, load_profile, thresholds_from_metrics)
from entropix.generate import Engine, Request, generate
from entropix.metrics import logit_metrics
from entropix.sampling import make_generator, make_sampler

NEG = float("-inf")
PAUSE_ID = 7
CFG = SamplerConfig(model="test", low_ent=1.0, low_vent=1.0, med_ent=3.0, high_ent=5.0, med_vent=4.0, high_vent=8.0)
QUESTION = "How many times does the letter r appear in strawberry?"


@dataclass
class FakeRow:
    generator: torch.Generator
    tokens: list = field(default_factory=list)
    choice: int = 0
    memory: dict = field(default_factory=dict)


def rows_for(n, seed=0, tokens=None):
    return [FakeRow(make_generator(seed + i), list(tokens[i]) if tokens else [1]) for i in range(n)]


def metrics_of(H, V, **attn):
    m = {"entropy": torch.tensor(H, dtype=torch.float32), "varentropy": torch.tensor(V, dtype=torch.float32)}
    for k, v in attn.items():
        m[k] = torch.tensor(v, dtype=torch.float32)
    return m


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
    g = torch.Generator().manual_seed(0)
    H = torch.rand(10_000, generator=g, dtype=torch.float64) * 10  # uniform on [0, 10]
    V = H * 2 + torch.rand(10_000, generator=g, dtype=torch.float64) * 4  # correlated, as in real models
    t = thresholds_from_metrics(H, V)
    assert t["low_ent"] == pytest.approx(3.0, abs=0.15)  # 30th percentile of H
    assert t["med_ent"] == pytest.approx(7.0, abs=0.15)
    assert t["high_ent"] == pytest.approx(9.0, abs=0.15)
    assert t["low_vent"] == pytest.approx(float(torch.quantile(V, 0.3)), abs=1e-3)
    assert t["high_vent"] == pytest.approx(float(torch.quantile(V, 0.8)), abs=1e-3)
    assert t["low_vent"] <= t["med_vent"]
    # med_vent is a quantile among the most uncertain tokens, so treading is reachable
    assert ((H >= t["high_ent"]) & (V < t["med_vent"])).any()
    SamplerConfig(**t)  # consistent ordering


# -- strategies ---------------------------------------------------------------------------------

def test_each_strategy_is_reached_from_constructed_metrics():
    s = EntropixSampler(CFG, pause_id=PAUSE_ID)
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    H = [0.5, 6.0, 6.0, 2.0, 4.0, 2.0]
    V = [0.5, 2.0, 2.0, 10.0, 10.0, 3.0]
    toks = [[1], [1], [3, PAUSE_ID], [1], [1], [1]]  # row 2 just paused
    tokens, codes = s(logits, metrics_of(H, V), rows_for(6, tokens=toks))
    assert [STATES[c] for c in codes.tolist()] == ["flowing", "pause", "treading", "branch", "resample", "adaptive"]
    assert tokens[0].item() == logits[0].argmax().item()
    assert tokens[1].item() == PAUSE_ID
    assert tokens[2].item() != PAUSE_ID
    assert s.state_of(codes[4].item()) == "resample"


def _mixture(vocab, top_p, tail):
    """top_p on token 0, the rest spread evenly over `tail` other tokens."""
    x = torch.full((vocab,), NEG)
    x[1:tail + 1] = math.log((1 - top_p) / tail)
    x[0] = math.log(top_p)
    return x


def test_each_strategy_is_reached_from_constructed_logits():
    s = EntropixSampler(CFG, pause_id=PAUSE_ID)
    vocab = 5000
    peaked = torch.zeros(vocab)
    peaked[42] = 30.0
    flat64 = torch.full((vocab,), NEG)
    flat64[100:164] = 0.0  # H = 6 bits, V = 0: uncertain and flat
    three = torch.full((vocab,), NEG)
    three[[10, 11, 12]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))  # H 1.49, V small: in between
    logits = torch.stack([peaked, flat64, _mixture(vocab, 0.9, 4096), _mixture(vocab, 0.5, 4096), three])
    m = logit_metrics(logits)
    tokens, codes = s(logits, m, rows_for(5))
    assert codes.tolist() == [FLOWING, PAUSE, BRANCH, RESAMPLE, ADAPTIVE]
    assert tokens[0].item() == 42 and tokens[1].item() == PAUSE_ID
    assert tokens[4].item() in (10, 11, 12)


def test_pause_never_repeats_and_respects_the_budget():
    for budget in (0, 1, 3):
        cfg = dataclasses.replace(CFG, pause_budget=budget)
        s = EntropixSampler(cfg, pause_id=PAUSE_ID)
        logits = torch.full((2, 300), NEG)
        logits[:, :64] = 0.0  # always treading; the pause token is also a likely ordinary draw
        m = logit_metrics(logits)
        rows = rows_for(2, seed=5)
        codes_seen = [[], []]
        for _ in range(60):
            tokens, codes = s(logits, m, rows)
            for i, r in enumerate(rows):
                r.tokens.append(tokens[i].item())
                codes_seen[i].append(codes[i].item())
        for i, r in enumerate(rows):
            # the budget counts every pause token in the answer, inserted or drawn
            assert codes_seen[i].count(PAUSE) <= budget and r.tokens.count(PAUSE_ID) >= codes_seen[i].count(PAUSE)
            assert codes_seen[i][0] == (PAUSE if budget else TREADING)
            assert all(not (a == b == PAUSE_ID) for a, b in zip(r.tokens, r.tokens[1:])), r.tokens
            assert set(codes_seen[i]) <= {PAUSE, TREADING}
            # every inserted pause is the pause token; careful sampling draws from the 64 live tokens
            for c, t in zip(codes_seen[i], r.tokens[1:]):
                assert (t == PAUSE_ID) if c == PAUSE else (0 <= t < 64)


def test_temperatures_and_filters_are_bounded():
    s = EntropixSampler(CFG)
    huge = metrics_of([0.5, 2.0, 4.0, 6.0, 2.5, 40.0], [0.5, 30.0, 30.0, 0.0, 6.0, 900.0],
                      attn_entropy=[20.0] * 6, attn_entropy_var=[50.0] * 6, agreement=[0.0] * 6,
                      interaction=[100.0] * 6)
    code, temp, top_k, top_p, min_p = s.plan(huge)
    assert set(code.tolist()) >= {FLOWING, BRANCH, RESAMPLE, TREADING, ADAPTIVE}
    assert (temp > 0).all() and (temp <= CFG.max_temperature).all()
    assert (top_k >= 1).all() and (top_k <= CFG.max_top_k).all()
    assert ((top_p > 0) & (top_p <= 1)).all() and ((min_p >= 0) & (min_p <= 0.5)).all()
    # the adaptive temperature grows with uncertainty until the bound
    _, t_lo, *_ = s.plan(metrics_of([2.0], [3.0]))
    _, t_hi, *_ = s.plan(metrics_of([4.5], [7.5]))
    assert t_lo.item() < t_hi.item() <= CFG.max_temperature


def test_best_of_n_score_depends_on_the_candidate():
    s = EntropixSampler(CFG)
    logq = torch.tensor([[-1.0, -1.0, -1.2]])  # two candidates equally likely under the adapted distribution
    model_logp = torch.tensor([[-0.1, -2.0, -2.1]]) * math.log(2)  # surprisals 0.1, 2.0, 2.1 bits
    score = s.score(logq, model_logp, torch.tensor([2.0]))
    assert score[0, 0] != score[0, 1]  # not a constant added to every candidate
    # a typical candidate beats an equally likely atypical one, and so does a slightly less likely typical one
    assert score[0, 1] > score[0, 0] and score[0, 2] > score[0, 0]


def test_one_rows_metrics_never_steer_another():
    s = EntropixSampler(CFG, pause_id=PAUSE_ID)
    torch.manual_seed(3)
    logits = torch.randn(2, 400) * 2
    outs = set()
    for h, v in ((0.1, 0.1), (6.0, 1.0), (2.0, 20.0), (9.0, 30.0)):  # row 1 in every region
        tokens, codes = s(logits, metrics_of([2.0, h], [3.0, v]), rows_for(2, seed=9))
        outs.add((tokens[0].item(), codes[0].item()))
    assert len(outs) == 1


def test_same_generator_state_same_token_and_rows_draw_their_own_streams():
    s = EntropixSampler(CFG)
    logits = torch.zeros(2, 400)  # identical flat rows: only the generators differ
    m = metrics_of([2.0, 2.0], [3.0, 3.0])
    a = [s(logits, m, rows_for(2, seed=1))[0].tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    draws = {tuple(s(logits, m, rows_for(2, seed=k))[0].tolist()) for k in range(6)}
    assert len(draws) > 1


# -- through the engine on the embedded model -------------------------------------------------------

def test_factory_uses_the_model_profile_and_tokenizer(lm, tmp_path):
    s = make_sampler("entropix", lm=lm, branches=10, branching=True)  # unknown extras are ignored
    assert isinstance(s, EntropixSampler) and s.needs_attention and s.states == STATES
    assert s.config.model == "smollm2-135m"
    assert s.pause_id == lm.tokenizer.find_token(" ...") and lm.tokenizer.token_text(s.pause_id) == " ..."
    path = tmp_path / "p.json"
    dataclasses.replace(CFG, pause_text=" ...").to_json(path)
    s2 = make_sampler("entropix", lm=lm, sampler_config=str(path), temperature=0.5)
    assert s2.config.low_ent == CFG.low_ent and s2.config.temperature == 0.5
    with pytest.raises(EntropixError):
        make_sampler("entropix", lm=lm, sampler_config=str(tmp_path / "nope.json"))


def _run(lm, prompts, seeds, max_tokens=24):
    s = make_sampler("entropix", lm=lm)
    tok = lm.tokenizer
    reqs = [Request(tok.encode_chat([{"role": "user", "content": p}]), s, max_tokens=max_tokens, seed=sd,
                    stop_ids=tok.stop_ids, id=f"r{i}") for i, (p, sd) in enumerate(zip(prompts, seeds))]
    out: dict[str, list] = {}
    for r in generate(Engine(lm), reqs):
        out.setdefault(r.request_id, []).append(r)
    return out


@pytest.mark.slow
def test_same_seed_same_output(lm):
    a = _run(lm, [QUESTION], [5])["r0"]
    b = _run(lm, [QUESTION], [5])["r0"]
    assert [(r.token, r.state) for r in a] == [(r.token, r.state) for r in b]


@pytest.mark.slow
def test_batch_of_four_rows_equals_each_row_alone(lm):
    prompts = [QUESTION, "Name a colour.", "Write a short poem about the sea at night.", "What is 7 times 8?"]
    seeds = [100, 101, 102, 103]
    batched = _run(lm, prompts, seeds)
    states = set()
    for i, (p, sd) in enumerate(zip(prompts, seeds)):
        alone = _run(lm, [p], [sd])["r0"]
        got = batched[f"r{i}"]
        assert [(r.token, r.state) for r in alone] == [(r.token, r.state) for r in got], p
        for a, b in zip(alone, got):
            for k in a.attn:
                assert a.attn[k] == pytest.approx(b.attn[k], abs=1e-3, rel=1e-3)
        states |= {r.state for r in got}
    assert len(states) >= 3


@pytest.mark.slow
def test_cli_generate_json_shows_metrics_and_several_strategies(capsys):
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
def test_cli_generate_prints_legend_and_summary_to_stderr(capsys):
    rc = main(["generate", "--sampler", "entropix", "--seed", "11", "--max-tokens", "12", QUESTION])
    cap = capsys.readouterr()
    assert rc == 0
    assert "legend:" in cap.err and "strategies:" in cap.err and "flowing" in cap.err
    assert "legend:" not in cap.out and cap.out.strip()


def test_summary_counts_each_strategy():
    s = EntropixSampler(CFG)
    recs = [{"state": "flowing"}] * 3 + [{"state": "pause"}]
    text = s.summary(recs, colour=False)
    assert "flowing 3 (75%)" in text and "pause 1 (25%)" in text
    assert all(st in text for st in STATES)  # the legend names every strategy
    assert "\033[" in s.summary(recs, colour=True)


@pytest.mark.slow
def test_cli_calibrate_writes_a_loadable_profile(tmp_path, capsys):
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

"""Confidence-pruned voting (deepconf) and early-stopping self-consistency (sc-early): the
confidence formulas on known numbers, the engine's prune rule, both strategies drawing exactly
self-consistency's samples with the same seed, and the CLI and server reporting what they spent."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from entropix.cli import main
from entropix.decode.deepconf import settled, threshold, weighted_vote
from entropix.decode.engine import generate
from entropix.decode.records import PruneRule, Request
from entropix.decode.scoring import Branch, lowest_window_confidence, token_confidence
from entropix.decode.strategies import Task, decode, run
from entropix.sampler import catalog

from tinymodel import tiny_lm


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(seed=4)


def sample(tiny):
    return catalog.resolve("sample", tiny, temperature=1.0).policy


def branch(choice: int, answer: str | None, finish: str = "stop") -> Branch:
    return Branch(choice, [1, 2], "x", answer, 0.0, [], [0.1, 0.1], finish)


# -- formulas on known numbers -------------------------------------------------------------------

def test_token_and_window_confidence_by_hand():
    assert token_confidence([-0.1, -2.0, -3.9]) == pytest.approx(2.0)  # (0.1 + 2 + 3.9) / 3
    c = [4.0, 4.0, 1.0, 1.0, 4.0, 4.0]
    assert lowest_window_confidence(c, 2) == pytest.approx(1.0)  # the two 1.0s in a row
    assert lowest_window_confidence(c, 3) == pytest.approx(2.0)  # (4 + 1 + 1) / 3
    assert lowest_window_confidence(c, 10) == pytest.approx(3.0)  # shorter than the window: the mean
    assert lowest_window_confidence([], 4) == 0.0


def test_threshold_is_the_lower_quantile_of_the_warm_up():
    assert threshold([3.0, 1.0, 2.0, 4.0], 0.9) == 1.0  # keep 90% of 4: the lowest passes at the line
    assert threshold([3.0, 1.0, 2.0, 4.0], 0.5) == 3.0  # keep half: the two above 3.0 ... and 3.0 itself
    assert threshold([5.0], 0.1) == 5.0


def test_weighted_vote_pools_equal_answers_and_leaves_pruned_traces_out():
    bs = [branch(0, "7"), branch(1, "8"), branch(2, "7.0"), branch(3, "8", "pruned"), branch(4, None)]
    answer, top, votes = weighted_vote(bs, [1.0, 2.5, 2.0, 9.0, 5.0], "number")
    assert answer == "7" and top == 2 and votes == {"7": 3.0, "8": 2.5}  # 1 + 2 beats 2.5; the pruned 9 is out
    assert weighted_vote([branch(0, "1"), branch(1, "2")], [1.0, 1.0], "number")[0] == "1"  # a tie: the first
    assert weighted_vote([branch(0, None)], [1.0], "number") == (None, 0, {})


def test_consensus_is_the_top_answers_share_of_all_warm_up_weight():
    bs = [branch(0, "7"), branch(1, "7.0"), branch(2, "8"), branch(3, None)]
    w = [3.0, 3.0, 2.0, 2.0]  # "7" holds 6 of 10: a trace without an answer still counts in the whole
    assert settled(bs, w, "number", 0.6) and not settled(bs, w, "number", 0.61)
    assert settled(bs[:2], w[:2], "number", 1.0)  # unanimous
    assert not settled(bs[:2], w[:2], "number", 2.0)  # above 1: never settled
    assert not settled([branch(0, None)], [1.0], "number", 0.0)  # no answer settles nothing


# -- the engine's prune rule -------------------------------------------------------------------------

def test_a_pruned_row_stops_at_its_first_window_below_the_threshold(tiny):
    req = Request(prompt=[65, 66, 67], policy=sample(tiny), max_tokens=24, n=3, seed=5, top_logprobs=5)
    full = {}
    for rec in generate(tiny.engine(), [req]):
        full.setdefault(rec.choice, []).append(rec)
    conf = {c: [token_confidence([lp for _, _, lp in r.top[:5]]) for r in recs] for c, recs in full.items()}
    window = 4
    lows = sorted(lowest_window_confidence(v, window) for v in conf.values())
    cut = (lows[0] + lows[1]) / 2  # between the least and the next least confident rows
    pruned = Request(prompt=req.prompt, policy=req.policy, max_tokens=24, n=3, seed=5, top_logprobs=5,
                     prune=PruneRule(window, cut, 5))
    got = {}
    for rec in generate(tiny.engine(), [pruned]):
        got.setdefault(rec.choice, []).append(rec)
    stopped = [c for c, recs in got.items() if recs[-1].finish_reason == "pruned"]
    assert len(stopped) == 1
    for c, recs in got.items():
        assert [r.token for r in recs] == [r.token for r in full[c]][:len(recs)]  # the same stream, cut short
        means = [sum(conf[c][i - window + 1:i + 1]) / window for i in range(window - 1, len(conf[c]))]
        first_low = next((i for i, m in enumerate(means) if m < cut), None)
        assert len(recs) == (first_low + window if c in stopped else len(full[c]))


def test_a_later_phase_numbers_its_rows_on(tiny):
    base = Request(prompt=[70, 71], policy=sample(tiny), max_tokens=6, n=5, seed=9)
    all5 = {}
    for rec in generate(tiny.engine(), [base]):
        all5.setdefault(rec.choice, []).append(rec.token)
    later = base.again(n=3, first_choice=2)
    assert later.id != base.id
    got = {}
    for rec in generate(tiny.engine(), [later]):
        got.setdefault(rec.choice, []).append(rec.token)
    assert got == {c: all5[c] for c in (2, 3, 4)}  # choices 2..4, each with its own seed's stream


# -- the strategies draw self-consistency's samples -------------------------------------------------

def _rows(res: dict) -> dict[int, list[int]]:
    return {b["choice"]: b["tokens"] for b in res["branches"]}


def test_deepconf_and_sc_early_decode_self_consistencys_samples(tiny):
    task = Task(prompts=[[80, 81, 82]], max_tokens=[12], seeds=[3])
    sc = run(tiny.engine(), decode(catalog.resolve("self-consistency", tiny, samples=8, temperature=1.0), task,
                                   tiny.tokenizer, 512))[0]
    dc_dec = catalog.resolve("deepconf", tiny, samples=8, temperature=1.0)
    dc = run(tiny.engine(), decode(dc_dec, task, tiny.tokenizer, 512))[0]
    assert sorted(_rows(dc)) == list(range(8))
    for c, toks in _rows(dc).items():
        assert toks == _rows(sc)[c][:len(toks)]  # a pruned trace is self-consistency's, cut short
    warm = dc_dec.params["warmup"]
    assert all(b["finish_reason"] != "pruned" for b in dc["branches"][:warm])
    assert dc["pruned"] == sum(b["finish_reason"] == "pruned" for b in dc["branches"])
    assert dc["tokens_generated"] == sum(len(t) for t in _rows(dc).values()) <= sc["tokens_generated"]
    early = run(tiny.engine(), decode(catalog.resolve("sc-early", tiny, samples=8, temperature=1.0), task,
                                      tiny.tokenizer, 512))[0]
    assert _rows(early) == {c: _rows(sc)[c] for c in _rows(early)}


def test_sc_early_stops_when_the_first_samples_agree_and_a_budget_caps_the_rest(tiny):
    task = Task(prompts=[[80, 81, 82]], max_tokens=[12], seeds=[3], kind="pattern", pattern=r"(?s)^(.)")
    agree = run(tiny.engine(), decode(catalog.resolve("sc-early", tiny, samples=8, temperature=0.0), task,
                                      tiny.tokenizer, 512))[0]
    assert agree["stopped_early"] and len(agree["branches"]) == 4  # T=0: four equal samples settle it
    spread = Task(prompts=[[80, 81, 82]], max_tokens=[12], seeds=[3], kind="pattern", pattern=r"(?s)(.)$",
                  token_budget=4 * 12 + 2 * 12)
    capped = run(tiny.engine(), decode(catalog.resolve("deepconf", tiny, samples=8, temperature=1.0), spread,
                                       tiny.tokenizer, 512))[0]
    warm_spent = sum(len(b["tokens"]) for b in capped["branches"][:4])
    assert len(capped["branches"]) == 4 + min(4, (spread.token_budget - warm_spent) // 12)


def test_deepconf_stops_after_a_warm_up_that_agrees(tiny):
    task = Task(prompts=[[80, 81, 82]], max_tokens=[12], seeds=[3], kind="pattern", pattern=r"(?s)^(.)")
    params = catalog.parameters("deepconf", samples=8, temperature=0.0)
    res = [run(tiny.engine(), decode(catalog.build("deepconf", {**params, "consensus": c}, tiny), task,
                                     tiny.tokenizer, 512))[0] for c in (1.0, 2.0)]
    assert len(res[0]["branches"]) == 4  # T=0: four equal warm-up traces hold all the weight
    assert len(res[1]["branches"]) == 8 and res[1]["answer"] == res[0]["answer"]  # consensus off: all of them
    assert res[0]["tokens_generated"] == sum(len(b["tokens"]) for b in res[0]["branches"][:4])


# -- front ends ---------------------------------------------------------------------------------------

def test_cli_deepconf_json_and_bad_budgets(cli_load_once, capsys):
    assert main(["generate", "What is 2 + 2?", "--sampler", "deepconf", "--samples", "6", "--max-tokens", "16",
                 "--seed", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["branches"]) == 6 and {"pruned", "threshold", "votes", "tokens_generated"} <= set(res)
    assert math.isfinite(res["threshold"])
    for argv, msg in ((["--sampler", "deepconf", "--token-budget", "0"], "at least 1"),
                      (["--sampler", "greedy", "--token-budget", "50"], "takes --sampler deepconf or sc-early")):
        assert main(["generate", "Hi", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1


def test_server_reports_what_the_votes_spent(tiny):
    from entropix.serve import ServerThread, create_app

    with ServerThread(create_app(tiny)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 8, "sampler": "deepconf", "samples": 6, "seed": 2}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        res = r.json()
        assert len(res["choices"]) == 6 and "pruned" in res and res["tokens_generated"] <= 6 * 8
        assert res["usage"]["completion_tokens"] == res["tokens_generated"]
        r = c.post("/v1/completions", json=dict(body, sampler="sc-early", token_budget=40))
        assert r.status_code == 200 and "stopped_early" in r.json()
        r = c.post("/v1/completions", json=dict(body, sampler="greedy", samples=None, token_budget=40))
        assert r.status_code == 400 and r.json()["error"]["param"] == "token_budget"

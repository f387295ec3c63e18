"""`--sampler auto`: the guarded choice, the entropy gate, and the sampler in the CLI, eval and server."""

from __future__ import annotations

import json

import pytest

from entropix.decode.auto import guarded_choice
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.decode.scoring import choose
from entropix.decode.strategies import Task, decode, run
from entropix.sampler import catalog
from entropix.sampler.policy import Greedy, Ranked

from tinymodel import tiny_lm


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(seed=2)


def _auto(lm, **over):
    return catalog.build("auto", {**catalog.parameters("auto"), **over}, lm)


# -- the guarded choice -------------------------------------------------------------------------

def test_margin_zero_is_plain_cot_and_a_margin_keeps_greedy():
    pairs = [("72", 0.5), ("72", 0.4), ("80", 0.7), (None, 0.0)]
    assert guarded_choice(pairs, 0.0, "max") == choose(pairs, False) == (2, "80")  # 0.7 beats greedy's 0.5
    assert guarded_choice(pairs, 0.0, "sum") == choose(pairs, True)
    assert guarded_choice(pairs, 0.25, "max") == (0, "72")  # ... but not by 0.25
    other = [("9.11", 0.6), ("9.9", 0.5), ("9.9", 0.4), ("9.9", 0.3)]
    assert guarded_choice(other, 0.5, "sum") == (1, "9.9")  # 1.2 summed beats 0.6 by more than 0.5
    assert guarded_choice(other, 0.7, "sum") == (0, "9.11")
    assert guarded_choice(other, 1.0, "votes") == (1, "9.9")  # 3 votes against 1
    assert guarded_choice(other, 2.0, "votes") == (0, "9.11")
    assert guarded_choice([(None, 0.0), ("3", 0.2)], 0.1, "max") == (1, "3")  # greedy without an answer scores 0
    assert guarded_choice([(None, 0.0), ("3", 0.2)], 0.3, "sum") == (0, None)
    assert guarded_choice([("5", 0.1)], 0.0, "sum") == (0, "5") and guarded_choice([], 0.0, "max") == (0, None)


# -- the strategy on an engine ------------------------------------------------------------------

def test_a_sure_greedy_answer_is_kept_and_an_unsure_one_is_cot(tiny):
    prompts = [[65, 66, 67, 68], [70, 71]]
    task = Task(prompts=prompts, max_tokens=[8, 8], seeds=[0, 1], stop_ids=frozenset({0}), follow_up=False,
                kind="pattern", pattern=r"[A-Za-z]")  # the tiny model's bytes: any letter is an answer
    sure = run(tiny.engine(), decode(_auto(tiny, gate_confidence=0.0), task, tiny.tokenizer, 512))
    assert any(res["answer"] is not None for res in sure)
    for p, res in zip(prompts, sure):
        greedy = [r.token for r in generate(tiny.engine(), [Request(p, Greedy(), max_tokens=8, stop_ids=frozenset({0}))])]
        if res["answer"] is None:
            continue  # no answer is never sure
        assert len(res["branches"]) == 1 and res["branches"][0]["tokens"] == greedy and res["choice"] == 0
        assert res["gated"] is False and res["tokens_generated"] == 2 * len(greedy)  # the probe counts
    dec = _auto(tiny, gate_confidence=2.0, margin=0.0, score="max", branches=4)  # never sure
    opened = run(tiny.engine(), decode(dec, task, tiny.tokenizer, 512))
    cot = run(tiny.engine(), decode(catalog.resolve("cot", tiny, branches=4), task, tiny.tokenizer, 512))
    for a, c in zip(opened, cot):
        assert a["gated"] is True and [b["tokens"] for b in a["branches"]] == [b["tokens"] for b in c["branches"]]
        assert (a["choice"], a["answer"]) == (c["choice"], c["answer"])
        assert a["tokens_generated"] == c["tokens_generated"] + len(c["branches"][0]["tokens"])


def test_the_catalogue_entry():
    s = catalog.spec("auto")
    assert s.strategy == "auto" and s.listed and "auto" in catalog.names(listed_only=True)
    d = catalog.resolve("auto", tiny_lm(), branches=6)
    assert isinstance(d.policy, Ranked) and d.rows_per_prompt == 6
    assert {"margin", "gate_confidence", "score"} <= set(d.params)
    assert any(x["name"] == "auto" and x["strategy"] == "auto" for x in catalog.describe())
    with pytest.raises(Exception, match="--temperature does not apply"):
        catalog.parameters("auto", strict=True, temperature=0.5)


# -- front ends ---------------------------------------------------------------------------------

def test_eval_runs_auto_and_records_its_gate(tiny, tmp_path):
    from entropix.evaluate.runner import run_eval
    from entropix.evaluate.tasks import make_task

    out = tmp_path / "auto.jsonl"
    s = run_eval(tiny, make_task("decimals", 3, 7), "auto", task="decimals", out=out, max_tokens=6, batch_size=30,
                 progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert s["n"] == 3 and len(rows) == 3
    assert all(r["sampler"] == "auto" and "branches" in r and r["tokens"] >= 1 for r in rows)
    assert rows[0]["params"]["gate_confidence"] == catalog.parameters("auto")["gate_confidence"]


def test_the_server_offers_and_runs_auto():
    import httpx
    import torch

    from entropix.serve import ServerThread, create_app

    lm = tiny_lm(max_position_embeddings=1024)
    with torch.no_grad():  # ASCII only, never the end of text
        lm.model.lm_head.weight[128:] = 0
        lm.model.lm_head.weight[0] = 0
    with ServerThread(create_app(lm, max_rows=16, max_n=10)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        specs = {s["name"]: s for s in c.get("/v1/entropix/info").json()["sampler_specs"]}
        assert specs["auto"]["strategy"] == "auto" and specs["auto"]["options"] == ["branches"]
        r = c.post("/v1/completions", json={"model": lm.name, "prompt": "Once", "max_tokens": 4, "sampler": "auto",
                                            "branches": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert 1 <= len(body["choices"]) <= 3 and body["usage"]["completion_tokens"] >= 5  # probe + a row
        r = c.post("/v1/completions", json={"model": lm.name, "prompt": "Once", "max_tokens": 4, "sampler": "auto",
                                            "samples": 3})
        assert r.status_code == 400 and "samples" in r.text


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    from tiny import write_hf_model

    return write_hf_model(tmp_path_factory.mktemp("auto") / "tiny", gguf_path)


def test_generate_with_auto_on_the_command_line(tiny_hf, capsys):
    from entropix.cli import main

    args = ["generate", "What is 2 + 3?", "--model", str(tiny_hf), "--sampler", "auto", "--branches", "3", "--json",
            "--max-tokens", "6"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["branches"]) in (1, 3) and res["score"] == "votes" and res["tokens_generated"] >= 2
    assert main(["generate", "hi", "--model", str(tiny_hf), "--sampler", "auto", "--branches", "0"]) == 2
    assert "--branches must be between 1 and 64" in capsys.readouterr().err


@pytest.mark.slow
def test_the_playground_lists_and_runs_auto(tmp_path):
    """The playground's sampler list comes from the catalogue: auto is there and shows its branches."""
    import torch

    from browser import close_chromium, launch_chromium
    from entropix.serve import ServerThread, create_app

    lm = tiny_lm(max_position_embeddings=1024)
    with torch.no_grad():  # ASCII only, never the end of text
        lm.model.lm_head.weight[128:] = 0
        lm.model.lm_head.weight[0] = 0
    p, browser = launch_chromium()
    try:
        with ServerThread(create_app(lm, max_rows=16, max_n=10)) as srv:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=20_000)
            assert "auto" in page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")
            page.click(".tab[data-mode=prompt]")
            page.select_option("#sampler", "auto")
            assert page.locator("#branches").is_visible() and not page.locator("#samples").is_visible()
            page.fill("#branches", "3")
            page.fill("#max_tokens", "6")
            page.fill("#prompt", "Q: What is 3 + 4?\nA:")
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=90_000)
            assert page.locator(".branch").count() in (1, 3) and page.locator(".branch .tok").count() >= 1
            assert not errors, errors
            page.close()
    finally:
        close_chromium(p, browser)

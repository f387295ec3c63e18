"""CoT, auto and self-consistency over an OpenAI-compatible upstream (`--engine openai`), with our
own server as the upstream: the strategies see the same tokens, answers and confidences as when
our engine decodes itself, though the upstream is asked only for completions and logprobs."""

from __future__ import annotations

import json

import pytest

from entropix.answer_format import prompt_answer_format
from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.decode.strategies import Task, decode, run
from entropix.sampler.policy import Greedy
from entropix.sampler import catalog
from entropix.serve import ServerThread, create_app

from tinymodel import tiny_lm

PROMPT = "Q: What is 12 + 30? A:"


def own_engine(lm, sampler: str, ids: list[int], max_tokens: int, **params) -> dict:
    """The strategy on our engine, as `entropix generate --json` runs it."""
    dec = catalog.resolve(sampler, lm, **params)
    kind, pattern = prompt_answer_format(PROMPT) or ("number", None)
    task = Task(prompts=[ids], max_tokens=[max_tokens], seeds=[None], stop_ids=lm.tokenizer.stop_ids, kind=kind,
                pattern=pattern)
    return run(lm.engine(dec.capture_layers), decode(dec, task, lm.tokenizer, lm.config.max_position_embeddings))[0]


def upstream(capsys, url: str, *args: str) -> tuple[int, dict | str]:
    rc = main(["generate", PROMPT, "--raw", "--json", "--engine", "openai", "--base-url", url + "/v1", *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else err)


def same_branches(got: dict, ref: dict) -> None:
    assert len(got["branches"]) == len(ref["branches"])
    for g, r in zip(got["branches"], ref["branches"]):
        assert g["text"] == r["text"] and g["answer"] == r["answer"]
        assert g["confidence"] == pytest.approx(r["confidence"], abs=1e-4)
    assert (got["answer"], got["choice"]) == (ref["answer"], ref["choice"])


@pytest.fixture(scope="module")
def tiny_server():
    lm = tiny_lm(max_position_embeddings=512)
    with ServerThread(create_app(lm, max_rows=16, max_n=8)) as srv:
        yield lm, srv.url


def test_cot_over_the_upstream_equals_our_engines_cot(tiny_server, capsys):
    lm, url = tiny_server
    rc, got = upstream(capsys, url, "--sampler", "cot", "--branches", "4", "--max-tokens", "10")
    assert rc == 0, got
    ref = own_engine(lm, "cot", lm.tokenizer.encode(PROMPT), 10, branches=4)
    same_branches(got, ref)
    stops = lm.tokenizer.stop_ids  # the upstream does not print its stop token, so a row ends before it
    assert [b["tokens"] for b in got["branches"]] == [[t for t in b["tokens"] if t not in stops]
                                                      for b in ref["branches"]]
    assert len({b["tokens"][0] for b in got["branches"]}) == 4  # four distinct first tokens


def test_greedy_and_auto_over_the_upstream(tiny_server, capsys):
    lm, url = tiny_server
    rc, got = upstream(capsys, url, "--max-tokens", "8")
    assert rc == 0, got
    ids = lm.tokenizer.encode(PROMPT)
    req = Request(prompt=ids, policy=Greedy(), max_tokens=8, stop_ids=lm.tokenizer.stop_ids)
    ref = [r for r in generate(lm.engine(), [req]) if r.token not in lm.tokenizer.stop_ids]
    assert got["tokens"] == [r.token for r in ref] and got["text"] == "".join(r.text for r in ref)
    assert [r["margin"] for r in got["records"]] == pytest.approx([r.margin for r in ref], abs=1e-5)
    rc, auto = upstream(capsys, url, "--sampler", "auto", "--branches", "3", "--max-tokens", "8")
    assert rc == 0, auto
    same_branches(auto, own_engine(lm, "auto", ids, 8, branches=3))


def test_self_consistency_draws_distinct_seeded_samples(tiny_server, capsys):
    _, url = tiny_server
    args = ("--sampler", "self-consistency", "--samples", "4", "--max-tokens", "8", "--seed", "5")
    rc, a = upstream(capsys, url, *args)
    rc2, b = upstream(capsys, url, *args)
    assert rc == rc2 == 0
    texts = [br["text"] for br in a["branches"]]
    assert len(texts) == 4 and len(set(texts)) > 1  # each row has its own seed
    assert texts == [br["text"] for br in b["branches"]]  # and the same seed gives the same rows


@pytest.mark.parametrize("args, says", [
    (["--sampler", "entropix"], "needs the whole next-token distribution"),
    (["--sampler", "entropix", "--branching"], "over an upstream"),
    (["--sampler", "dslider"], "over an upstream"),
])
def test_what_an_upstream_cannot_do_is_one_line(tiny_server, capsys, args, says):
    _, url = tiny_server
    rc, err = upstream(capsys, url, *args)
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1


def test_an_unreachable_upstream_is_one_line(capsys):
    rc, err = upstream(capsys, "http://127.0.0.1:9", "--sampler", "cot")
    assert rc == 2 and "upstream" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # the embedded model behind our server: stop tokens, follow-ups and a chat prompt
def test_cot_over_the_embedded_model_served_upstream(smol, capsys):
    with ServerThread(create_app(smol, max_rows=16, max_n=8)) as srv:
        rc, got = upstream(capsys, srv.url, "--sampler", "cot", "--branches", "3", "--max-tokens", "24")
    assert rc == 0, got
    ref = own_engine(smol, "cot", smol.tokenizer.encode(PROMPT), 24, branches=3)
    same_branches(got, ref)


def test_serve_upstream_offers_cot_over_another_server(tiny_server):
    """`entropix serve --upstream URL`: the app the CLI builds over the upstream answers CoT with
    the upstream's own CoT choices, and refuses what it cannot run in one OpenAI-shaped error."""
    import httpx

    from entropix.cli import build_parser
    from entropix.cli.common import load

    lm, url = tiny_server
    args = build_parser().parse_args(["serve", "--upstream", url + "/v1"])
    args.engine, args.base_url = "openai", args.upstream  # as cmd_serve does
    body = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 8, "sampler": "cot",
            "branches": 3}
    with ServerThread(create_app(load(args), max_rows=16, max_n=8)) as mid, httpx.Client(timeout=60) as http:
        got = http.post(mid.url + "/v1/chat/completions", json={"model": lm.name, **body})
        own = http.post(url + "/v1/chat/completions", json={"model": lm.name, **body})
        bad = http.post(mid.url + "/v1/chat/completions", json={"model": lm.name, "messages": body["messages"],
                                                                "sampler": "entropix"})
    assert got.status_code == own.status_code == 200, got.text
    pick = [(c["message"]["content"], round(c.get("confidence", 0), 4)) for c in got.json()["choices"]]
    assert pick == [(c["message"]["content"], round(c.get("confidence", 0), 4)) for c in own.json()["choices"]]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_sampler"

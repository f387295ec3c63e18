"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server.

Most tests run on a tiny in-memory model whose output layer only favours ASCII tokens
(so a token's text, bytes and the decoded text agree, and the end-of-text token is never
the argmax); the ones marked slow run the embedded model end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from entropix.cli import build_parser, main
from entropix.decode.strategies import ANSWER_PROMPT
from entropix.sampler import catalog
from entropix.sampler.policy import TokenPolicy
from entropix.serve import ServerThread, create_app

from tinymodel import ByteTokenizer, tiny_lm

KEY = "sekrit-test-key"
CHAT = [{"role": "user", "content": "What is 2 + 3?"}]
JSON_TYPE = {"content-type": "application/json"}


def ascii_lm(**over):
    """A tiny model (context 4096) whose logits for token 0 (end of text) and bytes >= 128 are 0:
    with ~64 positive ASCII logits per step, greedy and CoT's first ranks never pick them."""
    lm = tiny_lm(max_position_embeddings=4096, **over)
    with torch.no_grad():
        lm.model.lm_head.weight[128:] = 0
        lm.model.lm_head.weight[0] = 0
    return lm


@pytest.fixture(scope="module")
def tiny():
    return ascii_lm()


@pytest.fixture(scope="module")
def app(tiny):
    return create_app(tiny, max_rows=16, max_n=8)


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.name


def _error(r: httpx.Response, status: int, param: str | None = "unset", code: str | None = "unset") -> dict:
    """Assert an OpenAI-shaped error and return its inner object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "server_error")
    if param != "unset":
        assert err["param"] == param
    if code != "unset":
        assert err["code"] == code
    return err


def _still_serving(client, model):
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def _sse_events(text: str) -> list[dict]:
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


# -- the basics ---------------------------------------------------------------------------

def test_models(client, model, http):
    ids = [m.id for m in client.models.list().data]
    assert ids == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == model and health["scheduler"]["alive"]


def test_chat_stream_equals_non_stream(client, model):
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    ch = full.choices[0]
    assert full.object == "chat.completion" and ch.message.role == "assistant"
    assert ch.message.content and ch.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ch.message.content  # streamed greedy text equals the non-streamed one
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ch.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_and_stop(client, model, tiny):
    prompt = "The capital of France is"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
    assert full.object == "text_completion"
    assert full.usage.prompt_tokens == len(tiny.tokenizer.encode(prompt))
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 5
    text = full.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == text

    # a stop string cuts the text (and is never streamed), the same in both modes
    cut = text.strip()[:2]
    assert len(cut) == 2
    stopped = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, stop=[cut[1:]])
    assert stopped.choices[0].finish_reason == "stop" and cut[1:] not in stopped.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=5, temperature=0, stop=cut[1:], stream=True) if c.choices)
    assert streamed == stopped.choices[0].text


def test_completions_n_and_prompts(client, model):
    out = client.completions.create(model=model, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=2, n=2, seed=5,
                                    temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 8
    again = client.completions.create(model=model, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=2, n=2, seed=5,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible


def _check_chat_logprobs(out) -> None:
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    if out.choices[0].finish_reason == "length":
        assert "".join(i.token for i in content) == out.choices[0].message.content


def test_chat_logprobs(client, model):
    _check_chat_logprobs(client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0,
                                                        logprobs=True, top_logprobs=3))


def _check_completion_logprobs(out) -> None:
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_completion_logprobs(client, model):
    _check_completion_logprobs(client.completions.create(model=model, prompt="One, two, three,", max_tokens=3,
                                                         temperature=0, logprobs=2))


def test_entropix_sampler_returns_metrics(client, model):
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, seed=11,
                                         extra_body={"sampler": "entropix"})
    extra = out.choices[0].model_extra
    metrics = extra["entropix"]
    assert 1 <= len(metrics) <= 4
    for m in metrics:
        assert m["entropy"] >= 0 and m["varentropy"] >= 0
        assert isinstance(m["state"], str) and m["state"] not in ("greedy", "sample")
        assert m["top"] and 0 <= m["top"][0]["prob"] <= 1
        assert "attn_entropy" in m  # the entropix sampler reads attention metrics
    assert out.model_extra["entropix_sampler"] == "entropix"
    assert {"low_ent", "high_ent", "high_vent"} <= set(out.model_extra["entropix_thresholds"])

    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, seed=11, stream=True,
                                                 extra_body={"sampler": "entropix"}))
    per_chunk = [c.choices[0].model_extra.get("entropix") for c in chunks if c.choices and c.choices[0].delta.content]
    assert per_chunk and all(p and len(p) == 1 for p in per_chunk)


def test_metrics_on_request_for_plain_samplers(http, model):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 2,
                                                "temperature": 0, "metrics": True})
    assert r.status_code == 200, r.text
    metrics = r.json()["choices"][0]["entropix"]
    assert metrics and all(m["state"] == "greedy" for m in metrics)
    r = http.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 1, "temperature": 0})
    assert "entropix" not in r.json()["choices"][0]  # plain OpenAI responses stay lean


def _check_cot(body: dict) -> None:
    assert len(body["choices"]) == 3
    for c in body["choices"]:
        assert "confidence" in c and "answer" in c
        assert c["confidence"] is None or 0 <= c["confidence"] <= 1
    assert body["cot_choice"] in (0, 1, 2)
    firsts = {c["entropix"][0]["token"] for c in body["choices"]}
    assert len(firsts) == 3  # each branch starts from a different first token


def test_cot_branches_come_back_as_choices(http, model):
    r = http.post("/v1/completions", json={"model": model, "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 6,
                                           "sampler": "cot", "branches": 3})
    assert r.status_code == 200, r.text
    _check_cot(r.json())


def test_cot_stream_carries_the_scores_at_the_end(http, model):
    body = {"model": model, "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 6, "sampler": "cot", "branches": 3}
    full = http.post("/v1/completions", json=body).json()
    events = _sse_events(http.post("/v1/completions", json={**body, "stream": True}).text)
    last = events[-1]
    assert last["cot_choice"] == full["cot_choice"] and last["answer"] == full["answer"]
    assert [c["confidence"] for c in last["choices"]] == [c["confidence"] for c in full["choices"]]
    finishes = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert not finishes  # finish reasons wait for the scores
    texts = {i: "" for i in range(3)}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert [texts[i] for i in range(3)] == [c["text"] for c in full["choices"]]


def _check_self_consistency(body: dict) -> None:
    assert len(body["choices"]) == 3
    assert all("answer" in c and "confidence" in c for c in body["choices"])
    assert body["cot_choice"] in (0, 1, 2) and "votes" in body
    if body["answer"] is not None:
        assert body["choices"][body["cot_choice"]]["answer"] == body["answer"]


def test_self_consistency_votes(http, model):
    r = http.post("/v1/completions", json={"model": model, "prompt": "Q: What is 2 + 3?\nA: The answer is",
                                           "max_tokens": 3, "sampler": "self-consistency", "samples": 3, "seed": 1})
    assert r.status_code == 200, r.text
    _check_self_consistency(r.json())


def test_branching_returns_n_choices_with_the_tree_in_an_extra_field(http, model):
    """Entropy-triggered branching: thresholds that call every token a fork make rows fork at once;
    the answer still has exactly one choice per prompt (n), the root path, and the tree's paths
    (each a whole text from the start) are in `entropix_branches`."""
    always_branch = {"low_ent": 0, "med_ent": 50, "high_ent": 50, "low_vent": 0, "med_vent": 0, "high_vent": 0}
    body = {"model": model, "prompt": "Once", "max_tokens": 6, "seed": 3, "sampler": "entropix-branching",
            "sampler_config": always_branch}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    full = r.json()
    choices = full["choices"]
    assert len(choices) == 1  # n, though the rows forked
    root = choices[0]
    entries = root["entropix"]
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert "".join(e["text"] for e in entries) == root["text"]
    paths = root["entropix_branches"]
    assert len(paths) > 1 and full["forks"] >= 1
    assert paths[0]["choice"] == 0 and paths[0]["text"] == root["text"]
    forks = paths[1:]
    assert all("parent" in p for p in forks)
    # a fork's text starts with its parent's text before the fork
    assert any(p["text"][:1] == root["text"][:1] for p in forks if p["parent"][0] == 0 and p["parent"][1] > 0)
    assert 0 <= full["branch_choice"] < len(paths) and full["answer"] == paths[full["branch_choice"]]["answer"]
    assert full["usage"]["completion_tokens"] > len(entries)  # forks' tokens count in usage
    events = _sse_events(http.post("/v1/completions", json={**body, "stream": True}).text)
    text = "".join(c["text"] for e in events for c in e.get("choices", []) if "text" in c)
    assert {c["index"] for e in events for c in e.get("choices", [])} == {0}
    assert text == root["text"]  # seeded: the stream decodes the same tree
    last = [e for e in events if e.get("choices") and "entropix_branches" in e["choices"][0]]
    assert last and [p["text"] for p in last[-1]["choices"][0]["entropix_branches"]] == [p["text"] for p in paths]


def test_attention_layers_must_be_the_servers(http, model):
    body = {"model": model, "prompt": "Once", "max_tokens": 2, "sampler": "entropix",
            "sampler_config": {"attention_layers": [0]}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and "attention layers" in r.json()["error"]["message"], r.text


# -- the CoT follow-up ----------------------------------------------------------------------

BOS = 255  # a byte the ASCII model never prefers


class BosTokenizer(ByteTokenizer):
    """A Llama-3-like tokenizer: BOS first unless told add_bos=False."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return ([] if add_bos is False else [BOS]) + super().encode(text)


def test_cot_follow_up_has_no_bos_inside(monkeypatch):
    """Branches cut off by max_tokens without an answer are asked "So the answer is"; that
    suffix joins the sequence mid-way, so it must not bring a BOS of its own."""
    lm = dataclasses.replace(ascii_lm(), tokenizer=BosTokenizer())
    app = create_app(lm, max_rows=8, max_n=8)
    sched, seen = app.state.scheduler, []
    submit = sched.submit
    monkeypatch.setattr(sched, "submit", lambda req, **kw: (seen.append(req), submit(req, **kw))[1])
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": lm.name, "messages": CHAT, "max_tokens": 4,
                                                    "sampler": "cot", "branches": 3})
    assert r.status_code == 200, r.text
    assert seen[0].prompt[0] == BOS and seen[0].n == 3
    follow_ups = seen[1:]
    assert follow_ups  # some branch ended without an answer
    suffix = list(ANSWER_PROMPT.encode())
    for req in follow_ups:
        assert req.prompt[-len(suffix):] == suffix
        assert BOS not in req.prompt[1:], req.prompt
    asked = [c for c in r.json()["choices"] if "follow_up" in c]
    assert all(c["follow_up"].startswith(ANSWER_PROMPT) for c in asked)
    assert r.json()["usage"]["completion_tokens"] > 3 * 4  # the follow-ups count in usage


# -- bad requests ---------------------------------------------------------------------------

def test_bad_requests_get_openai_errors(http, client, model):
    url = "/v1/chat/completions"
    ok = {"model": model, "messages": CHAT, "max_tokens": 1}
    _error(http.post(url, content=b"{not json", headers=JSON_TYPE), 400, None, "invalid_json")
    _error(http.post(url, content=b"[1, 2]", headers=JSON_TYPE), 400, None, "invalid_json")
    _error(http.post(url, content=b'{"model": "x", "temperature": NaN}', headers=JSON_TYPE), 400, None, "invalid_json")
    _error(http.post(url, json={**ok, "temperature": "hot"}), 400, "temperature", "invalid_type")
    _error(http.post(url, json={**ok, "messages": "hello"}), 400, "messages", "invalid_type")
    _error(http.post(url, json={**ok, "n": 1.5}), 400, "n", "invalid_type")
    _error(http.post(url, json={**ok, "stream": "yes"}), 400, "stream", "invalid_type")
    _error(http.post(url, json={**ok, "top_p": 2}), 400, "top_p", "invalid_value")
    _error(http.post(url, json={**ok, "max_tokens": 0}), 400, "max_tokens", "invalid_value")
    _error(http.post(url, json={**ok, "n": 100}), 400, "n", "invalid_value")
    _error(http.post(url, json={**ok, "frobnicate": 1}), 400, "frobnicate", "unknown_parameter")
    _error(http.post(url, json={"messages": CHAT}), 400, "model", "missing_required_parameter")
    _error(http.post(url, json={**ok, "messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages[0].role")
    _error(http.post(url, json={**ok, "sampler": "nope"}), 400, "sampler")
    _error(http.post(url, json={**ok, "top_logprobs": 2}), 400, "top_logprobs")
    _error(http.post(url, json={**ok, "max_tokens": 10**6}), 400, "max_tokens", "context_length_exceeded")
    _error(http.post("/v1/completions", json={"model": model, "prompt": [1] * 9000, "max_tokens": 1}),
           400, "prompt", "context_length_exceeded")
    _error(http.post(url, json={**ok, "model": "gpt-9"}), 404, "model", "model_not_found")
    _error(http.post(url, content=b"x" * (3 * 1024 * 1024), headers=JSON_TYPE), 413, None, "request_too_large")
    _error(http.get("/v1/nothing-here"), 404)
    _error(http.get("/v1/chat/completions"), 405)

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=CHAT, top_p=2)
    assert e.value.status_code == 400 and e.value.code == "invalid_value" and e.value.param == "top_p"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert e.value.code == "model_not_found"
    assert http.get("/health").json()["status"] == "ok"
    _still_serving(client, model)


def test_sampler_options_are_checked_against_the_catalogue(http, model):
    url = "/v1/chat/completions"
    ok = {"model": model, "messages": CHAT, "max_tokens": 1}
    err = _error(http.post(url, json={**ok, "branches": 3}), 400, "branches", "invalid_value")
    assert "cot" in err["message"]
    _error(http.post(url, json={**ok, "sampler": "greedy", "samples": 3}), 400, "samples", "invalid_value")
    _error(http.post(url, json={**ok, "sampler": "greedy", "sampler_config": {}}), 400, "sampler_config")
    _error(http.post(url, json={**ok, "answer_kind": "number"}), 400, "answer_kind", "invalid_value")
    err = _error(http.post(url, json={**ok, "sampler": "cot", "n": 2}), 400, "n", "invalid_value")
    assert "branches" in err["message"]
    _error(http.post(url, json={**ok, "sampler": "cot", "branches": 9}), 400, "branches", "invalid_value")
    _error(http.post(url, json={**ok, "sampler": "cot"}), 400, "branches", "invalid_value")  # its default 10 > 8
    _error(http.post(url, json={**ok, "sampler": "entropix", "sampler_config": {"low_ent": -1}}), 400, "sampler",
           "invalid_sampler")
    _error(http.post(url, json={**ok, "sampler": "entropix", "temperature": 0}), 400, "sampler", "invalid_sampler")


def test_api_key(tiny, model):
    with ServerThread(create_app(tiny, api_key=KEY)) as srv:
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=model, messages=CHAT, max_tokens=1)
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            _error(http.post("/v1/chat/completions", json={"model": model, "messages": CHAT}), 401, None, "missing_api_key")
            _error(http.get("/v1/models", headers={"Authorization": "Basic " + KEY}), 401, None, "invalid_api_key")
            assert http.get("/health").status_code == 200  # probes and the playground page need no key
            assert http.get("/").status_code == 200
        right = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in right.models.list().data] == [model]
        _still_serving(right, model)


# -- concurrency and disconnects ------------------------------------------------------------------

def test_disconnect_stops_generation(server, app, model):
    sched = app.state.scheduler
    before, tokens_before = sched.stats()["cancelled"], sched.stats()["tokens"]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got >= 2:
                    break  # leave: closing the response drops the connection
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        s = sched.stats()
        if s["cancelled"] > before and s["rows"] == 0:
            break
        time.sleep(0.02)
    s = sched.stats()
    assert s["cancelled"] == before + 1 and s["rows"] == 0 and s["running_requests"] == 0
    spent = s["tokens"] - tokens_before
    assert spent < 4000  # it did not run to its 4000 tokens
    time.sleep(0.2)
    assert sched.stats()["tokens"] - tokens_before == spent  # and nothing decodes any more


def test_eight_concurrent_streams(server, app, model):
    sched = app.state.scheduler
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)

    async def one(i: int):
        stream = await client.completions.create(model=model, prompt=f"List {i} fruits:", max_tokens=100,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, finish

    async def run_all():
        try:
            return await asyncio.gather(*[one(i) for i in range(8)])
        finally:
            await client.close()

    before = sched.stats()["max_batch_rows"]
    results = asyncio.run(run_all())
    assert len(results) == 8
    assert all(finish == "length" and text for text, finish in results)
    assert max(before, sched.stats()["max_batch_rows"]) >= 4  # they were decoded together


# -- the playground files and the CLI ------------------------------------------------------------

def test_playground_is_served(http):
    r = http.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "<canvas" in r.text and "/static/app.js" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    js = http.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert http.get("/static/style.css").status_code == 200


def test_info_lists_the_catalogue(http, tiny):
    info = http.get("/v1/entropix/info").json()
    assert info["samplers"] == catalog.names(listed_only=True) == [s["name"] for s in info["sampler_specs"]]
    cot = next(s for s in info["sampler_specs"] if s["name"] == "cot")
    assert cot["defaults"]["branches"] == catalog.spec("cot").defaults["branches"] and "aggregate" in cot["options"]
    assert info["thresholds"] == catalog.default_thresholds(tiny)
    assert info["context_length"] == 4096 and info["max_n"] == 8


def test_serve_command(capsys):
    args = build_parser().parse_args(["serve", "--port", "8123", "--api-key", "k"])
    assert args.port == 8123 and args.api_key == "k" and args.host == "127.0.0.1" and args.backend == "torch"
    assert main(["serve", "--port", "0"]) == 2
    assert "entropix: error: --port" in capsys.readouterr().err


def test_serve_start_up_line_names_the_chat_app(capsys, monkeypatch, tiny):
    """The line `entropix serve` prints on start names both web pages, on stderr like other notices."""
    import socket

    import entropix.cli.serve as serve_cli

    started = []
    monkeypatch.setattr(serve_cli, "load", lambda args: tiny)  # no model load for a print
    monkeypatch.setattr(serve_cli, "GracefulServer", lambda config, sched, timeout: type(
        "NoServer", (), {"run": lambda self: started.append(config.port)})())  # ... and no uvicorn loop
    with socket.socket() as s:  # a port free now, so that the command's own check passes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--port", str(port)]) == 0 and started == [port]
    out, err = capsys.readouterr()
    line = next(x for x in err.splitlines() if x.startswith("entropix server for"))
    assert f"http://127.0.0.1:{port}" in line and "playground at /" in line and "chat at /chat" in line, line
    assert "/chat" not in out


def test_stream_is_server_sent_events(http, model):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 1, "stream": True,
                                                "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert all(e["object"] == "chat.completion.chunk" for e in _sse_events(r.text))


@dataclass(frozen=True)
class _Broken(TokenPolicy):
    """A policy whose host-side inputs fail: the engine step that samples it raises."""

    def host_inputs(self, rows):
        raise RuntimeError("sampler exploded")


def test_sampler_failure_is_an_openai_error(http, client, model, monkeypatch):
    spec = catalog.SamplerSpec("broken-test", "fails", "single", lambda params, model: _Broken())
    monkeypatch.setitem(catalog._BY_NAME, "broken-test", spec)
    body = {"model": model, "messages": CHAT, "max_tokens": 2, "sampler": "broken-test"}
    err = _error(http.post("/v1/chat/completions", json=body), 500, None, "generation_failed")
    assert err["type"] == "server_error" and "sampler exploded" in err["message"]
    # once the stream has started, the error travels as an SSE event, then [DONE]
    events = _sse_events(http.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert events[-1]["error"]["code"] == "generation_failed"
    _still_serving(client, model)


# -- the embedded model, end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(smol):
    with ServerThread(create_app(smol, max_rows=16, max_n=8)) as srv:
        yield srv


@pytest.mark.slow
def test_embedded_model_end_to_end(embedded, smol):
    """The real tokenizer and chat template: multi-byte tokens in logprobs, stop strings, CoT, votes."""
    client = openai.OpenAI(base_url=embedded.url + "/v1", api_key="x", max_retries=0, timeout=300)
    assert client.models.retrieve("default").id == smol.name  # the embedded model's aliases
    _check_chat_logprobs(client.chat.completions.create(model=smol.name, messages=CHAT, max_tokens=4, temperature=0,
                                                        logprobs=True, top_logprobs=3))
    _check_completion_logprobs(client.completions.create(model=smol.name, prompt="One, two, three,", max_tokens=3,
                                                         temperature=0, logprobs=2))
    full = client.chat.completions.create(model=smol.name, messages=CHAT, max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=smol.name, messages=CHAT, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == full.choices[0].message.content
    with httpx.Client(base_url=embedded.url, timeout=300) as http:
        r = http.post("/v1/completions", json={"model": smol.name, "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 6,
                                               "sampler": "cot", "branches": 3})
        assert r.status_code == 200, r.text
        _check_cot(r.json())
        r = http.post("/v1/completions", json={"model": smol.name, "prompt": "Q: What is 2 + 3?\nA: The answer is",
                                               "max_tokens": 3, "sampler": "self-consistency", "samples": 3,
                                               "seed": 1})
        assert r.status_code == 200, r.text
        _check_self_consistency(r.json())

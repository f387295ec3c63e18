"""/tokenize and /detokenize (vLLM's fields) on a real uvicorn server over a tiny model: the ids
are the ones the completion routes decode from, and token-id prompts round-trip."""

from __future__ import annotations

import httpx
import pytest

from entropix.serve import ServerThread, create_app

from tinymodel import tiny_lm

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def served():
    lm = tiny_lm(max_position_embeddings=512)
    with ServerThread(create_app(lm, max_rows=4)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        yield lm, http


def test_a_prompt_tokenizes_as_the_model_does_and_detokenizes_back(served):
    lm, http = served
    text = "Entropy: 2.5 bits, caf\u00e9 \u2615"
    r = http.post("/tokenize", json={"model": lm.name, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == lm.tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512
    assert body["token_strs"] == [lm.tokenizer.token_text(t) for t in body["tokens"]]
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == lm.tokenizer.encode(text, add_bos=False) and plain["token_strs"] is None
    back = http.post("/detokenize", json={"model": lm.name, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": lm.tokenizer.decode(body["tokens"])}


def test_messages_tokenize_to_the_chat_routes_prompt(served):
    """The ids /tokenize gives for messages are the prompt /v1/chat/completions decodes from (its
    usage says as many), and /v1/completions with those ids as the prompt gives the same greedy text."""
    lm, http = served
    ids = http.post("/tokenize", json={"model": lm.name, "messages": CHAT}).json()["tokens"]
    assert ids == lm.tokenizer.encode_chat(CHAT)
    chat = http.post("/v1/chat/completions", json={"model": lm.name, "messages": CHAT, "max_tokens": 6,
                                                   "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] == len(ids)
    comp = http.post("/v1/completions", json={"model": lm.name, "prompt": ids, "max_tokens": 6,
                                              "temperature": 0}).json()
    assert comp["choices"][0]["text"] == chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"messages": CHAT, "add_generation_prompt": False}, "add_generation_prompt"),
    ("/tokenize", {"prompt": "hi", "model": "no-such-model"}, "model"),
    ("/tokenize", {"prompt": "hi", "colour": "red"}, None),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, None),
])
def test_bad_requests_get_one_openai_shaped_error(served, route, body, param):
    _, http = served
    r = http.post(route, json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param

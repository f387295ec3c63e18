"""An OpenAI-compatible server as an upstream: its completions with token-id prompts and
logprobs, and its tokenizer through /tokenize and /detokenize (vLLM's routes; our server
has them too).

Everything the strategies need is asked in token ids: a branch continues from its exact ids,
never from re-tokenized text, so a prefix cache upstream serves the k branches of one prompt.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import httpx

from .. import EntropixError

TOKEN_PREFIX = "token_id:"


class Upstream:
    """One model behind `base_url` (".../v1"); its first /v1/models entry unless `model` names one."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0) -> None:
        self.base = base_url.rstrip("/")
        self.root = self.base.removesuffix("/v1")  # /tokenize and /detokenize live beside /v1
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)
        self.model = model or self._first_model()

    def _call(self, method: str, url: str, body: dict | None = None) -> dict:
        try:
            r = self.http.request(method, url, json=body)
        except httpx.HTTPError as e:
            raise EntropixError(f"upstream {url}: {type(e).__name__}: {str(e) or 'no answer'}") from None
        if r.status_code != 200:
            raise EntropixError(f"upstream {url}: HTTP {r.status_code}: {_message(r)}")
        try:
            return r.json()
        except ValueError:
            raise EntropixError(f"upstream {url}: the answer is not JSON") from None

    def _first_model(self) -> str:
        data = self._call("GET", self.base + "/models").get("data") or []
        if not data:
            raise EntropixError(f"upstream {self.base}/models lists no model")
        return str(data[0]["id"])

    def post(self, path: str, body: dict, root: bool = False) -> dict:
        return self._call("POST", (self.root if root else self.base) + path, {"model": self.model, **body})

    def complete(self, prompt: Sequence[int], max_tokens: int, logprobs: int, **sampling: Any) -> dict:
        """One completion of a token-id prompt, its tokens named by id: the first choice."""
        body = {"prompt": list(prompt), "max_tokens": max_tokens, "logprobs": logprobs,
                "return_tokens_as_token_ids": True, **{k: v for k, v in sampling.items() if v is not None}}
        out = self.post("/completions", body)
        choice = (out.get("choices") or [None])[0]
        if not choice or not choice.get("logprobs"):
            raise EntropixError(f"upstream {self.base}/completions gave no logprobs (CoT and auto need them)")
        return choice


def _message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or r.json().get("detail") or r.text
    except ValueError:
        err = r.text
    msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    return " ".join(msg.split())[:300] or r.reason_phrase


def token_id(name: str) -> int:
    """The id in a "token_id:N" name (vLLM's return_tokens_as_token_ids)."""
    if not name.startswith(TOKEN_PREFIX):
        raise EntropixError(f"the upstream named a token {name!r}, not 'token_id:N': it does not support "
                            "return_tokens_as_token_ids, which CoT over an upstream needs")
    return int(name[len(TOKEN_PREFIX):])


class RemoteTokenizer:
    """The upstream's own tokenizer, as much of the Tokenizer protocol as the strategies use.

    No route names the stop tokens: the upstream stops its own rows, and `stop_ids` (a set that
    tasks hold by reference) grows as the engine sees which tokens it stopped at."""

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.stop_ids: set[int] = set()
        probe = up.post("/tokenize", {"prompt": ""}, root=True)
        self.max_model_len = int(probe.get("max_model_len") or 0)

    vocab_size = 1 << 31  # not told: the upstream checks the ids it is given

    def find_token(self, text: str) -> int:
        """The token whose text is text (-1 where it takes several): the pause token's lookup."""
        ids = self.encode(text, add_bos=False)
        return ids[0] if len(ids) == 1 else -1

    def token_bytes(self, token_id: int) -> bytes:
        return self.token_text(token_id).encode()

    def learn_stop(self, token: int) -> None:
        self.stop_ids.add(int(token))

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        body: dict[str, Any] = {"prompt": text}
        if add_bos is False:
            body["add_special_tokens"] = False
        return [int(t) for t in self.up.post("/tokenize", body, root=True)["tokens"]]

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return [int(t) for t in self.up.post("/tokenize", {"messages": messages}, root=True)["tokens"]]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.up.post("/detokenize", {"tokens": list(ids)}, root=True)["prompt"])

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's share of the text of ids: one token at a time where that adds up to the
        whole (most text), else prefix by prefix (characters split across tokens)."""
        whole = self.decode(ids)
        one = [self.token_text(t) for t in ids]
        if "".join(one) == whole:
            return one
        out, done = [], ""
        for i in range(len(ids)):
            text = self.decode(ids[:i + 1])
            if text.endswith("\ufffd"):  # half a character: wait for the rest
                out.append("")
                continue
            out.append(text[len(done):])
            done = text
        if out and whole.startswith(done):
            out[-1] += whole[len(done):]  # a character the ids leave unfinished, as the whole text shows it
        return out

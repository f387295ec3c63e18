"""CoT decoding, `auto` and self-consistency over any OpenAI-compatible engine (vLLM, our server).

`UpstreamEngine` stands where our host engine stands for the strategies (decode/phases.py):
it takes their requests and gives back one TokenRecord per generated token, computed from the
upstream's /v1/completions with token-id prompts and logprobs:
- greedy rows: one completion at temperature 0;
- CoT rows (Ranked): one 1-token completion gives the top-k first tokens; branch c is then
  continued greedily from prompt + [its first token] (the upstream's prefix cache makes the k
  continuations cheap);
- sampled rows (self-consistency): one seeded completion per row.
Entropy and varentropy come from the top logprobs only (the rest of the mass as one outcome:
a lower bound), so samplers that decide from the whole distribution are refused.
"""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

from .. import EntropixError
from ..decode.records import Request, TokenRecord
from ..decode.rng import row_seed
from ..sampler.policy import Greedy, Ranked, Sample, TokenPolicy
from .upstream_http import RemoteTokenizer, Upstream, token_id

MAX_LOGPROBS = 20  # OpenAI's and vLLM's default ceiling


# what an upstream can run: completions at temperature 0 or sampled, and CoT's first-token ranks
SAMPLERS = ("greedy", "sample", "temperature", "min-p", "cot", "cot-agg", "auto", "self-consistency")


def check_sampler(name: str) -> None:
    """Refuse, before anything connects, a sampler that decides from the whole distribution."""
    if name not in SAMPLERS:
        raise EntropixError(f"the {name} sampler needs the whole next-token distribution; over an upstream "
                            f"engine use one of {', '.join(SAMPLERS)}")


def check_policy(policy: TokenPolicy, name: str) -> None:
    if not isinstance(policy, (Greedy, Ranked, Sample)) or (isinstance(policy, Greedy) and policy.capture):
        raise EntropixError(f"the {name} sampler needs the whole next-token distribution; over an upstream "
                            "engine use greedy, cot, auto or self-consistency")


@dataclass
class _Row:
    request: Request


@dataclass
class _Step:
    """One position of a completion: the chosen id, its logprob, the top (id, logprob) pairs."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def steps_of(choice: dict) -> list[_Step]:
    lp = choice["logprobs"]
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    out = []
    for name, x, top in zip(lp["tokens"], lp["token_logprobs"], tops):
        pairs = sorted(((token_id(k), float(v)) for k, v in (top or {}).items()), key=lambda p: -p[1])
        out.append(_Step(token_id(name), float(x) if x is not None else -math.inf, pairs))
    return out


def distribution_stats(top: Sequence[tuple[int, float]]) -> tuple[float, float, float]:
    """(entropy, varentropy, margin) in bits from the top logprobs, the rest of the mass as one outcome."""
    ps = [math.exp(x) for _, x in top if math.isfinite(x)]
    rest = max(0.0, 1.0 - sum(ps))
    if rest > 1e-12:
        ps = ps + [rest]
    surprisal = [-math.log2(p) for p in ps if p > 0]
    ps = [p for p in ps if p > 0]
    h = sum(p * s for p, s in zip(ps, surprisal))
    v = sum(p * (s - h) ** 2 for p, s in zip(ps, surprisal))
    first = math.exp(top[0][1]) if top else 0.0
    second = math.exp(top[1][1]) if len(top) > 1 else 0.0
    return h, v, first - second


class UpstreamEngine:
    """The host engine's members that the strategies and the server's scheduler use, over an
    upstream: each request runs to its end in a worker thread (its rows concurrently upstream), and
    a step returns the records of the requests that finished since the last one."""

    prefill_chunk: int | None = None
    backend = SimpleNamespace(name="openai")

    def __init__(self, up: Upstream, tokenizer: Any, texts: Any, max_context: int, workers: int = 16) -> None:
        self.up, self.tok, self.texts, self.max_context = up, tokenizer, texts, max_context
        self.prefills: list = []  # prompts are read upstream: nothing to read in chunks here
        self.rows: list[_Row] = []
        self.pool = ThreadPoolExecutor(workers)
        self.futures: dict[str, Future] = {}

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def validate(self, req: Request) -> None:
        check_policy(req.policy, req.policy.label)
        if len(req.prompt) + req.max_tokens > self.max_context:
            raise EntropixError(f"{len(req.prompt)} prompt tokens + {req.max_tokens} new ones exceed the upstream's "
                                f"context ({self.max_context})")

    def add(self, requests: Sequence[Request]) -> None:
        for r in requests:
            check_policy(r.policy, r.policy.label)
        for r in requests:
            self.rows.append(_Row(r))
            self.futures[r.id] = self.pool.submit(self._request, r)

    def live_ids(self) -> set[str]:
        return {r.request.id for r in self.rows}

    def cancel(self, request_id: str) -> None:
        self.rows = [r for r in self.rows if r.request.id != request_id]
        fut = self.futures.pop(request_id, None)
        if fut is not None:
            fut.cancel()  # a running one finishes upstream; its records are dropped

    def step(self) -> list[TokenRecord]:
        if not self.futures:
            return []
        done, _ = wait(list(self.futures.values()), return_when=FIRST_COMPLETED)
        ids = {rid for rid, f in self.futures.items() if f in done}
        self.rows = [r for r in self.rows if r.request.id not in ids]
        out: list[TokenRecord] = []
        for rid in ids:
            out += self.futures.pop(rid).result()  # an upstream error fails the step, as a backend's would
        return out

    def _request(self, req: Request) -> list[TokenRecord]:
        first = self._first(req)
        with ThreadPoolExecutor(min(16, req.n)) as pool:
            rows = list(pool.map(lambda c: self._row(req, c, first), range(req.n)))
        return [rec for recs in rows for rec in recs]

    def _first(self, req: Request) -> list[_Step] | None:
        """CoT's one-token completion: the top-k first tokens of the prompt."""
        if not isinstance(req.policy, Ranked):
            return None
        k = max(req.n, req.top_logprobs)
        if k > MAX_LOGPROBS:
            raise EntropixError(f"CoT over an upstream ranks at most {MAX_LOGPROBS} first tokens, asked {k}")
        # ignore_eos: a stop token ranked first is still reported, with the alternatives beside it
        ranked = steps_of(self.up.complete(req.prompt, 1, k, temperature=0, ignore_eos=True))
        plain = self.up.complete(req.prompt, 1, 1, temperature=0)
        if ranked and not plain["logprobs"]["tokens"] and plain.get("finish_reason") == "stop":
            self._learn_stop(ranked[0].token)  # greedy stops at once: the top first token is a stop token
        return ranked

    def _learn_stop(self, token: int) -> None:
        """A remote tokenizer learns the stop tokens the upstream stops at (no route names them)."""
        learn = getattr(self.tok, "learn_stop", None)
        if learn is not None:
            learn(token)

    def _row(self, req: Request, choice: int, first: list[_Step] | None) -> list[TokenRecord]:
        k = min(max(2, req.top_logprobs), MAX_LOGPROBS)
        stop = list(req.stop_strings) or None
        if first is not None:  # CoT: this branch's first token, then greedy from it
            ranked = first[0].top
            if len(ranked) <= choice:
                raise EntropixError(f"the upstream gave {len(ranked)} first-token logprobs; CoT asked for {req.n}")
            tok, lp = ranked[choice]
            head = [_Step(tok, lp, ranked)]
            if req.max_tokens <= 1 or tok in self.tok.stop_ids:
                return self._records(req, choice, head, "length" if tok not in self.tok.stop_ids else "stop", None,
                                     "cot-branch")
            c = self.up.complete(req.prompt + [tok], req.max_tokens - 1, k, temperature=0, stop=stop)
            return self._records(req, choice, head + steps_of(c), c.get("finish_reason"), c.get("text"), "cot-branch")
        c = self.up.complete(req.prompt, req.max_tokens, k, stop=stop, **_sampling(req, choice))
        first_regime = "sample" if isinstance(req.policy, Sample) else "greedy"
        return self._records(req, choice, steps_of(c), c.get("finish_reason"), c.get("text"), first_regime)

    def _records(self, req: Request, choice: int, steps: list[_Step], finish: str | None, tail: str | None,
                 first_regime: str) -> list[TokenRecord]:
        own = len(steps) - (1 if first_regime == "cot-branch" else 0)  # the tokens `tail` is the text of
        texts = fit_texts(self.texts([s.token for s in steps]), tail, own)
        if finish == "stop" and not req.stop_strings and texts and texts[-1] == "" \
                and self.tok.token_text(steps[-1].token):
            self._learn_stop(steps[-1].token)  # printed by us, not by the upstream: the token it stopped at
        texts = ["" if s.token in self.tok.stop_ids else t for s, t in zip(steps, texts)]  # as our engine prints
        later = "sample" if first_regime == "sample" else "greedy"
        out = []
        for i, (s, text) in enumerate(zip(steps, texts)):
            h, v, margin = distribution_stats(s.top)
            top = [(t, self.tok.token_text(t), x) for t, x in s.top[:req.top_logprobs]]
            out.append(TokenRecord(request_id=req.id, choice=choice, index=i, token=s.token, text=text,
                                   logprob=s.logprob, top=top, entropy=h, varentropy=v, margin=margin, attn=None,
                                   regime=first_regime if i == 0 else later,
                                   finish_reason=(finish or "length") if i == len(steps) - 1 else None))
        return out


def _sampling(req: Request, choice: int) -> dict[str, Any]:
    if not isinstance(req.policy, Sample):
        return {"temperature": 0}
    p = req.policy.params
    return {"temperature": p.temperature, "top_p": p.top_p if p.top_p < 1 else None,
            "top_k": p.top_k or None, "min_p": p.min_p or None, "seed": row_seed(req.seed, choice) & (2**63 - 1)}


def fit_texts(texts: list[str], tail: str | None, tail_tokens: int) -> list[str]:
    """Each token's text, cut where the upstream's own text for the last `tail_tokens` ends (a stop
    string, or a stop token it does not print): the records then add up to what it returned."""
    if tail is None:
        return texts
    want = "".join(texts[:len(texts) - tail_tokens]) + tail
    if not "".join(texts).startswith(want):  # it decodes otherwise: keep the tokens' own texts
        return texts
    out, left = [], len(want)
    for t in texts:
        out.append(t[:left])
        left -= len(out[-1])
    return out


@dataclass
class UpstreamModel:
    """What `entropix generate` needs of a model, with an upstream computing."""

    name: str
    config: Any
    tokenizer: Any
    up: Upstream
    texts: Any
    backend: str = "openai"
    device: str = "upstream"
    dtype: str = "upstream"
    samplers: tuple[str, ...] = SAMPLERS  # what the server offers over it

    def engine(self, capture_layers: tuple[int, ...] = ()) -> UpstreamEngine:
        return UpstreamEngine(self.up, self.tokenizer, self.texts, self.config.max_position_embeddings)


def connect(base_url: str, model: str | None = None, tokenizer: Any = None, api_key: str | None = None,
            max_context: int | None = None) -> UpstreamModel:
    """An upstream's model; its own /tokenize and /detokenize unless a local tokenizer is given."""
    up = Upstream(base_url, model, api_key)
    if tokenizer is None:
        remote = RemoteTokenizer(up)
        tokenizer, texts, ctx = remote, remote.texts, max_context or remote.max_model_len or 4096
    else:
        texts, ctx = _local_texts(tokenizer), max_context or 4096
    return UpstreamModel(up.model, SimpleNamespace(max_position_embeddings=ctx), tokenizer, up, texts)


def _local_texts(tok: Any):
    def texts(ids: Sequence[int]) -> list[str]:
        d = tok.detokenizer()
        out = [d.add(t) for t in ids]
        if out:
            out[-1] += d.flush()
        return out
    return texts

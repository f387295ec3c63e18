"""OpenAI-compatible HTTP server and the web playground.

`create_app(lm)` builds a FastAPI app whose /v1/chat/completions and /v1/completions
routes feed one shared `Scheduler` (continuous batching: concurrent requests decode
in the same engine steps). Every sampler is reachable through the extra `sampler`
field; per-token metrics travel in an extra `entropix` field on each choice; CoT and
self-consistency rows come back as choices with their confidence or answer.
Errors always have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from . import EntropixError, __version__

try:  # the `server` extra; without it the CLI still loads and `serve` says what to install
    from fastapi import Request as HTTPRequest
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    _MISSING_DEP = None
except ModuleNotFoundError as _e:  # pragma: no cover
    _MISSING_DEP = _e.name
    BaseModel, HTTPRequest, ValidationError = object, object, Exception
    ConfigDict = dict

    def Field(*a, **k):
        return None

from .answers import answers_equal, extract_answer
from .cot import ANSWER_PROMPT, answer_confidence, choose, majority_vote, score_branches
from .generate import Request, TokenRecord
from .scheduler import Job, Scheduler, SchedulerBusy

log = logging.getLogger("entropix.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY = 2 * 1024 * 1024
FINGERPRINT = f"entropix-{__version__}"
# Quadrant thresholds (bits) of the original sampler: the fallback when a sampler has none.
DEFAULT_THRESHOLDS = {"low_ent": 0.1, "med_ent": 3.0, "high_ent": 5.0, "low_vent": 0.1, "high_vent": 5.0}
THRESHOLD_KEYS = ("low_ent", "med_ent", "high_ent", "low_vent", "med_vent", "high_vent")
COT_NAMES = {"cot", "cot-decoding"}
SC_NAMES = {"self-consistency", "self_consistency", "sc"}
ANSWER_KINDS = ("number", "option", "text", "list")


# -- errors -----------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as one OpenAI-style line."""
    err = e.errors()[0]
    param = _param_name(tuple(err["loc"]))
    kind, msg, got = err["type"], err["msg"], err.get("input")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid", "model_attributes_type"):
        return bad_request(f"Invalid type for '{param}': {msg[0].lower() + msg[1:]}, "
                           f"but got {_JSON_TYPES.get(type(got), type(got).__name__)} instead.", param, "invalid_type")
    return bad_request(f"Invalid '{param}': {msg[0].lower() + msg[1:]} (got {json.dumps(got)}).", param, "invalid_value")


# -- request models ----------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Params(_Strict):
    """Parameters shared by both completion routes (OpenAI's, then our extras)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # extras
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    sampler: str | None = None
    sampler_config: dict[str, Any] | None = None
    branches: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1)
    aggregate: bool | None = None
    answer_kind: Literal["number", "option", "text", "list"] | None = None
    metrics: bool | None = None
    ignore_eos: bool | None = None


class ChatRequest(_Params):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Params):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# -- samplers ----------------------------------------------------------------------------

def sampler_thresholds(sampler: Any) -> dict[str, float] | None:
    """The (entropy, varentropy) quadrant thresholds a sampler uses, if it exposes them."""
    th = getattr(sampler, "thresholds", None)
    if callable(th):
        try:
            th = th()
        except Exception:
            th = None
    sources = [th] if isinstance(th, dict) else []
    for attr in ("config", "cfg"):
        cfg = getattr(sampler, attr, None)
        if cfg is None:
            continue
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            d = dataclasses.asdict(cfg)
        elif isinstance(cfg, dict):
            d = cfg
        else:
            d = dict(getattr(cfg, "__dict__", {}))
        sources.append(d)
        sources.extend(v for v in d.values() if isinstance(v, dict))  # one nested level (e.g. "thresholds")
    out: dict[str, float] = {}
    for src in sources:
        for key in THRESHOLD_KEYS:
            for cand in (key, key + "_thresh", key + "_threshold"):
                v = src.get(cand)
                if key not in out and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[key] = float(v)
    return out or None


@dataclasses.dataclass
class Plan:
    """How one API request decodes: the sampler factory, rows per prompt, extras."""

    name: str
    kind: str  # "plain", "cot" or "self-consistency"
    factory: Callable[[], Any]
    n: int
    metrics: bool
    answer_kind: str = "number"
    aggregate: bool = False


def plan_sampler(p: _Params, lm, max_n: int) -> Plan:
    """Resolve sampler name and parameters into a Plan (APIError for bad combinations)."""
    from .sampling import make_sampler

    name = (p.sampler or "").strip().lower() or None
    temp = p.temperature
    n = p.n if p.n is not None else 1
    if n > max_n:
        raise bad_request(f"n must be at most {max_n} on this server, got {n}", "n", "invalid_value")
    for extra, owner in (("branches", COT_NAMES), ("aggregate", COT_NAMES), ("samples", SC_NAMES),
                         ("answer_kind", COT_NAMES | SC_NAMES)):
        if getattr(p, extra) is not None and name not in owner:
            raise bad_request(f"'{extra}' applies to the {sorted(owner)[0]} sampler only", extra, "invalid_value")
    if p.sampler_config is not None and not (name or "").startswith("entropix"):
        raise bad_request("'sampler_config' applies to the entropix sampler only", "sampler_config", "invalid_value")
    filters = {k: getattr(p, k) for k in ("top_k", "top_p", "min_p") if getattr(p, k) is not None}

    if name is None:  # OpenAI's default temperature is 1: sample unless temperature is 0
        name = "greedy" if temp == 0 else "sample"
    if name in ("sample", "temperature") and temp == 0:
        name = "greedy"
    metrics = p.metrics

    if name in COT_NAMES or name in SC_NAMES:
        if n != 1:
            raise bad_request(f"n must be 1 with the {name} sampler (use "
                              f"'{'branches' if name in COT_NAMES else 'samples'}')", "n", "invalid_value")
        k = (p.branches if name in COT_NAMES else p.samples) or (10 if name in COT_NAMES else 5)
        if k > max_n:
            which = "branches" if name in COT_NAMES else "samples"
            raise bad_request(f"{which} must be at most {max_n} on this server, got {k}", which, "invalid_value")
        kind = p.answer_kind or "number"
        if name in COT_NAMES:
            _try_sampler(lambda: make_sampler("cot", lm=lm, branches=k), "cot")
            return Plan("cot", "cot", lambda: make_sampler("cot", lm=lm, branches=k), k,
                        True if metrics is None else metrics, kind, bool(p.aggregate))
        # Self-consistency: k seeded temperature samples in one batch, majority vote afterwards.
        t = 0.7 if temp is None else temp
        kw = {"temperature": t, **filters}
        plain = "greedy" if t == 0 else "sample"
        _try_sampler(lambda: make_sampler(plain, **kw), "self-consistency")
        return Plan("self-consistency", "self-consistency", lambda: make_sampler(plain, **kw), k,
                    True if metrics is None else metrics, kind)

    if name in ("greedy", "argmax"):
        return Plan("greedy", "plain", lambda: make_sampler("greedy"), n, bool(metrics))
    if name in ("sample", "temperature"):
        kw = {"temperature": 1.0 if temp is None else temp, **filters}
        _try_sampler(lambda: make_sampler("sample", **kw), name)
        return Plan("sample", "plain", lambda: make_sampler("sample", **kw), n, bool(metrics))
    kw = dict(filters)
    if temp is not None:
        kw["temperature"] = temp
    if p.sampler_config is not None:
        kw["sampler_config"] = dict(p.sampler_config)
    _try_sampler(lambda: make_sampler(name, lm=lm, **kw), name)
    return Plan(name, "plain", lambda: make_sampler(name, lm=lm, **kw), n,
                name.startswith("entropix") if metrics is None else metrics)


def _try_sampler(make: Callable[[], Any], name: str) -> Any:
    try:
        return make()
    except EntropixError as e:
        raise bad_request(str(e), "sampler", "invalid_sampler") from None
    except (TypeError, ValueError, KeyError) as e:
        raise bad_request(f"invalid parameters for the {name} sampler: {e}", "sampler", "invalid_value") from None


# -- per-choice bookkeeping ----------------------------------------------------------------

def _r(x: float | None, digits: int = 5) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _lp(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's stand-in for -inf


class ChoiceState:
    """Text, logprobs and metrics of one output row, with stop-string hold-back.

    Text that could be the start of a stop string is held back until it is clear,
    so a streamed text is always a prefix of the final one (equal to the non-streamed text).
    """

    def __init__(self, index: int, prompt_index: int, tok, stop_strings: tuple[str, ...],
                 stop_ids: frozenset[int]) -> None:
        self.index, self.prompt_index = index, prompt_index
        self.tok, self.stop_strings, self.stop_ids = tok, stop_strings, stop_ids
        self.raw = ""  # engine deltas joined
        self.text = ""  # what was released to the client
        self.tokens: list[int] = []
        self.records: list[TokenRecord] = []
        self.finish_reason: str | None = None
        self.extra: dict[str, Any] = {}  # confidence, answer (cot / self-consistency)

    def is_stop_token(self, rec: TokenRecord) -> bool:
        return rec.finish_reason == "stop" and rec.token in self.stop_ids

    def feed(self, rec: TokenRecord) -> str:
        """Take one record; return the text to release now."""
        self.records.append(rec)
        if not self.is_stop_token(rec):
            self.tokens.append(rec.token)
        self.raw += rec.text
        if rec.finish_reason:
            self.finish_reason = rec.finish_reason
            if rec.finish_reason == "stop" and not self.is_stop_token(rec) and self.stop_strings:
                final = self._cut(self.tok.decode(self.tokens))
            else:
                final = self.raw
            if not final.startswith(self.text):  # cannot happen with hold-back; keep the stream consistent
                final = self.text
            out, self.text = final[len(self.text):], final
            return out
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.raw)), hold, -1):
                if self.raw.endswith(s[:k]):
                    hold = k
                    break
        safe = self.raw[:len(self.raw) - hold] if hold else self.raw
        if len(safe) <= len(self.text):
            return ""
        out, self.text = safe[len(self.text):], safe
        return out

    def _cut(self, text: str) -> str:
        pos = [text.find(s) for s in self.stop_strings]
        pos = [p for p in pos if p >= 0]
        return text[:min(pos)] if pos else text


def metric_entry(tok, rec: TokenRecord) -> dict[str, Any]:
    """The per-token record of the `entropix` field."""
    d: dict[str, Any] = {
        "index": rec.index, "token": rec.token, "piece": tok.token_text(rec.token), "text": rec.text,
        "logprob": _r(rec.logprob), "entropy": _r(rec.entropy), "varentropy": _r(rec.varentropy),
        "margin": _r(rec.margin), "state": rec.state,
        "top": [{"token": t, "text": s, "logprob": _r(lp), "prob": _r(math.exp(lp)) if math.isfinite(lp) else 0.0}
                for t, s, lp in rec.top],
    }
    if rec.attn:
        d.update({k: _r(v) for k, v in rec.attn.items()})
    return d


def chat_logprob(tok, rec: TokenRecord, k: int) -> dict[str, Any]:
    return {
        "token": tok.token_text(rec.token), "logprob": _lp(rec.logprob), "bytes": list(tok.token_bytes(rec.token)),
        "top_logprobs": [{"token": s, "logprob": _lp(lp), "bytes": list(tok.token_bytes(t))} for t, s, lp in rec.top[:k]],
    }


# -- one API request in flight ----------------------------------------------------------------

class Run:
    """The engine jobs of one API request (one per prompt) and their choices."""

    def __init__(self, app_state: "AppState", route: str, prompts: list[list[int]], plan: Plan,
                 max_tokens: list[int], seed: int | None, stop: tuple[str, ...], top_logprobs: int | None,
                 ignore_eos: bool) -> None:
        self.s, self.route, self.prompts, self.plan = app_state, route, prompts, plan
        tok = app_state.lm.tokenizer
        self.tok = tok
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.stop, self.stop_ids = stop, (frozenset() if ignore_eos else tok.stop_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: dict[int, ChoiceState] = {}
        self.choice_of: dict[tuple[int, int], int] = {}  # (prompt, engine row choice) -> API choice index
        for pi in range(len(prompts)):
            for c in range(plan.n):
                self._new_choice(pi, c)
        k_engine = max(top_logprobs or 0, 5 if plan.metrics else 0, 1)
        self.jobs: list[Job] = []
        self.job_prompt: dict[str, int] = {}
        self.thresholds: dict[str, float] | None = None
        loop = asyncio.get_running_loop()
        try:
            for pi, ids in enumerate(prompts):
                sampler = plan.factory()  # one per prompt: samplers may keep per-request state
                if plan.metrics and self.thresholds is None:
                    self.thresholds = sampler_thresholds(sampler) or app_state.thresholds()
                req = Request(prompt=ids, sampler=sampler, max_tokens=max_tokens[pi], n=plan.n, seed=seed,
                              stop_ids=self.stop_ids, stop_strings=stop, top_logprobs=k_engine,
                              id=f"{route}-{uuid.uuid4().hex[:16]}")
                job = app_state.scheduler.submit(req, loop=loop, queue=self.queue)
                self.jobs.append(job)
                self.job_prompt[job.id] = pi
        except SchedulerBusy as e:
            self.cancel()
            raise APIError(429, str(e), "rate_limit_error", None, "server_busy") from None
        except EntropixError as e:
            self.cancel()
            raise bad_request(str(e), None, "context_length_exceeded" if "context" in str(e) else None) from None
        except Exception:
            self.cancel()
            raise

    def _new_choice(self, pi: int, c: int) -> ChoiceState:
        idx = len(self.choices)
        ch = self.choices[idx] = ChoiceState(idx, pi, self.tok, self.stop, self.stop_ids)
        self.choice_of[(pi, c)] = idx
        return ch

    def cancel(self) -> None:
        for job in self.jobs:
            self.s.scheduler.cancel(job)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.records) for c in self.choices.values()) + getattr(self, "extra_tokens", 0)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self) -> AsyncIterator[tuple[ChoiceState, TokenRecord, str]]:
        """(choice, record, released text) for every generated token, until every job ends."""
        left = len(self.jobs)
        while left:
            job, kind, payload = await self.queue.get()
            if kind == "records":
                pi = self.job_prompt[job.id]
                for rec in payload:
                    idx = self.choice_of.get((pi, rec.choice))
                    if idx is None:  # a row the sampler forked (entropy-triggered branching)
                        ch = self._new_choice(pi, rec.choice)
                        pre = "".join(ch.feed(r) for r in self._fork_prefix(job, pi, rec.choice))
                        yield ch, rec, pre + ch.feed(rec)
                        continue
                    ch = self.choices[idx]
                    yield ch, rec, ch.feed(rec)
                continue
            left -= 1
            if kind == "error":
                self.cancel()
                raise APIError(500, f"generation failed: {payload}", "server_error", None, "generation_failed")
            if kind == "cancelled":
                self.cancel()
                raise APIError(503, "the request was cancelled (server shutting down)", "server_error", None, "cancelled")

    def _fork_prefix(self, job: Job, pi: int, c: int) -> list[TokenRecord]:
        """Records a forked row shares with its parent (the sampler's `parents` says where it forked)."""
        parents = getattr(job.request.sampler, "parents", None) or {}
        if c not in parents:
            return []
        pc, at = parents[c]
        parent = self.choices.get(self.choice_of.get((pi, pc), -1))
        return [r for r in parent.records if r.index < at] if parent is not None else []

    async def finish(self) -> dict[str, Any]:
        """Score CoT branches or vote self-consistency samples; the top-level extras."""
        if self.plan.kind == "cot":
            return await self._finish_cot()
        if self.plan.kind == "self-consistency":
            order = sorted(self.choices)
            kind = self.plan.answer_kind
            answers = [extract_answer(self.choices[i].text, kind) for i in order]
            winner, first, votes = majority_vote(answers, kind)
            for i, a in zip(order, answers):  # a sample's confidence is its answer's share of the vote
                share = 0.0
                if a is not None:
                    share = max((v for rep, v in votes.items() if answers_equal(rep, a, kind)), default=0) / len(order)
                self.choices[i].extra = {"answer": a, "confidence": _r(share)}
            return {"cot_choice": order[first] if order else 0, "answer": winner, "votes": votes}
        return {}

    async def _finish_cot(self) -> dict[str, Any]:
        order = sorted(self.choices)
        rows = [self.choices[i].records for i in order]
        try:
            res = score_branches(rows, aggregate=self.plan.aggregate, kind=self.plan.answer_kind)
            branches = [dict(b) for b in res.get("branches", [])]
            if len(branches) != len(order):
                raise ValueError(f"{len(branches)} scores for {len(order)} branches")
            follow = await self._cot_follow_up(branches)
        except APIError:
            raise
        except Exception as e:
            log.exception("scoring the CoT branches failed")
            raise APIError(500, f"scoring the CoT branches failed: {type(e).__name__}: {e}",
                           "server_error", None, "cot_failed") from None
        for i, b in zip(order, branches):
            self.choices[i].extra = {"confidence": _r(b.get("confidence")), "answer": b.get("answer")}
            if i in follow:
                self.choices[i].extra["follow_up"] = follow[i]
        if follow:  # answers changed: choose again (max path, or agg path by summed confidence)
            choice, answer = choose([(b.get("answer"), b.get("confidence") or 0.0) for b in branches],
                                    self.plan.aggregate)
        else:
            choice, answer = int(res.get("choice", 0)), res.get("answer")
        return {"cot_choice": order[choice] if order else 0, "answer": answer}

    async def _cot_follow_up(self, branches: list[dict]) -> dict[int, str]:
        """Ask "So the answer is" of branches that gave no answer (batched in the scheduler)."""
        suffix_text = ANSWER_PROMPT
        if self.stop_ids != self.tok.stop_ids:
            return {}
        from .sampling import make_sampler

        suffix = self.tok.encode(suffix_text)
        queue: asyncio.Queue = asyncio.Queue()
        todo: dict[str, tuple[int, list[TokenRecord]]] = {}
        for i, b in enumerate(branches):
            ch = self.choices[sorted(self.choices)[i]]
            ids = self.prompts[0] + ch.tokens + suffix
            if b.get("answer") is not None or len(ids) + 16 >= self.s.max_context:
                continue
            req = Request(prompt=ids, sampler=make_sampler("greedy"), max_tokens=16, stop_ids=self.tok.stop_ids,
                          top_logprobs=2, id=f"{self.route}-followup-{uuid.uuid4().hex[:12]}")
            job = self.s.scheduler.submit(req, queue=queue)
            self.jobs.append(job)
            todo[job.id] = (i, [])
        left = len(todo)
        while left:
            job, kind, payload = await queue.get()
            if kind == "records":
                todo[job.id][1].extend(payload)
            elif kind == "done":
                left -= 1
            else:
                raise APIError(500, f"the CoT follow-up failed: {payload or kind}", "server_error", None, "cot_failed")
        out = {}
        self.extra_tokens = sum(len(recs) for _, recs in todo.values())
        for i, recs in todo.values():
            answer, conf, _ = answer_confidence(recs, self.plan.answer_kind)
            if answer is not None:
                branches[i]["answer"], branches[i]["confidence"] = answer, conf
                out[sorted(self.choices)[i]] = suffix_text + "".join(r.text for r in recs)
        return out


# -- the app -------------------------------------------------------------------------------

class AppState:
    def __init__(self, lm, scheduler: Scheduler, api_key: str | None, max_n: int, max_body: int,
                 default_max_tokens: int, max_context: int) -> None:
        self.lm, self.scheduler, self.api_key = lm, scheduler, api_key
        self.max_n, self.max_body, self.default_max_tokens = max_n, max_body, default_max_tokens
        self.max_context = max_context
        self.created = int(time.time())
        self.model_names = {lm.name}
        from .weights import DEFAULT_ALIASES, DEFAULT_MODEL

        if lm.name == DEFAULT_MODEL:
            self.model_names |= DEFAULT_ALIASES
        self._thresholds: dict[str, float] | None = None
        self._samplers: list[str] | None = None

    def thresholds(self) -> dict[str, float]:
        """The default entropix sampler's thresholds, else the original's."""
        if self._thresholds is None:
            th = None
            try:
                from .sampling import make_sampler

                th = sampler_thresholds(make_sampler("entropix", lm=self.lm))
            except Exception:
                th = None
            self._thresholds = {**DEFAULT_THRESHOLDS, **(th or {})}
        return self._thresholds

    def samplers(self) -> list[str]:
        if self._samplers is None:
            from .sampling import make_sampler

            out = ["greedy", "sample"]
            try:
                make_sampler("entropix", lm=self.lm)
                out.append("entropix")
            except Exception:
                pass
            out.append("cot")
            out.append("self-consistency")
            self._samplers = out
        return self._samplers

    def check_key(self, request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if not auth:
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).", "invalid_request_error", None, "missing_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           "invalid_request_error", "model", "model_not_found")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object (413 past `limit` bytes, 400 for anything else)."""
    too_big = APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                       None, "request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    if not body.strip():
        raise bad_request("The request body is empty; expected a JSON object.", None, "invalid_json")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). "
                          "The body must be valid JSON.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    return data


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def message_text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        raise bad_request(f"messages[{i}].content is required", f"messages[{i}].content", "invalid_value")
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                              "are supported", f"messages[{i}].content[{j}]", "invalid_value")
        parts.append(part["text"])
    return "".join(parts)


def check_common(p: _Params) -> tuple[str, ...]:
    """Validate what pydantic cannot express; return the stop strings."""
    if p.presence_penalty or p.frequency_penalty:
        which = "presence_penalty" if p.presence_penalty else "frequency_penalty"
        raise bad_request(f"{which} is not supported by this server (only 0)", which, "unsupported_parameter")
    if p.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    if p.stream_options is not None and not p.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    if len(stop) > 16:
        raise bad_request(f"stop may hold at most 16 strings, got {len(stop)}", "stop", "invalid_value")
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop", "invalid_value")
    if p.sampler is not None and not p.sampler.strip():
        raise bad_request("sampler must not be empty", "sampler", "invalid_value")
    return tuple(stop)


def budget(state: AppState, prompt_len: int, asked: int | None, default: int, param: str,
           prompt_param: str) -> int:
    """max_tokens for one prompt, within the model's context."""
    ctx = state.max_context
    if prompt_len >= ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens, but the prompt has "
                          f"{prompt_len} tokens. Please shorten the prompt.", prompt_param,
                          "context_length_exceeded")
    if asked is None:
        return max(1, min(default, ctx - prompt_len))
    if prompt_len + asked > ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested "
                          f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                          "Please reduce the prompt or the completion length.", param, "context_length_exceeded")
    return asked


def create_app(lm, api_key: str | None = None, *, max_rows: int = 32, max_n: int = 16,
               max_body_bytes: int = DEFAULT_MAX_BODY, default_max_tokens: int = 512,
               max_context: int | None = None, cors_origins: list[str] | tuple[str, ...] = (),
               max_pending: int = 256):
    """The FastAPI app serving `lm` (its scheduler thread runs while the app is up)."""
    if _MISSING_DEP:
        raise EntropixError(f"the server needs {_MISSING_DEP}: pip install 'entropix[server]'")
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    sched = Scheduler(lm, max_rows=max_rows, max_pending=max_pending, capture_layers=_default_capture_layers(lm))
    ctx = min(max_context or sched.engine.max_context, sched.engine.max_context)
    state = AppState(lm, sched, api_key or None, min(max_n, max_rows), max_body_bytes, default_max_tokens, ctx)

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        try:
            yield
        finally:
            sched.stop()

    app = FastAPI(title="entropix", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages load from a CDN
    app.state.entropix = state
    app.state.scheduler = sched
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, msg, "invalid_request_error", None, code).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse(bad_request(str(exc.errors()[0].get("msg", "invalid request"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"The server had an error while processing your request "
                                          f"({type(exc).__name__}).", "server_error").body(), status_code=500)

    # -- meta routes --------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok" if sched.alive else "stopped", "model": lm.name, "scheduler": sched.stats()}

    def model_card() -> dict[str, Any]:
        return {"id": lm.name, "object": "model", "created": state.created, "owned_by": "entropix",
                "context_length": state.max_context}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        state.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        state.check_key(request)
        state.check_model(model_id)
        return model_card()

    @app.get("/v1/entropix/info")
    async def info(request: HTTPRequest):
        """What the playground needs: samplers, thresholds, limits."""
        state.check_key(request)
        samplers = await asyncio.to_thread(state.samplers)
        return {"model": lm.name, "samplers": samplers, "thresholds": state.thresholds(),
                "context_length": state.max_context, "max_n": state.max_n, "version": __version__,
                "scheduler": sched.stats()}

    # -- completions ------------------------------------------------------------------------
    async def parse(request: HTTPRequest, model_cls):
        """Key, body, schema, model name and the checks both routes share: (params, stop strings)."""
        state.check_key(request)
        data = await read_json(request, state.max_body)
        try:
            p = model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        state.check_model(p.model)
        return p, check_common(p)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        p, stop = await parse(request, ChatRequest)
        if not p.messages:
            raise bad_request("messages must hold at least one message", "messages", "invalid_value")
        if p.top_logprobs is not None and not p.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
        if p.response_format is not None and p.response_format.get("type") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format",
                              "unsupported_parameter")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
                for i, m in enumerate(p.messages)]
        try:
            ids = lm.tokenizer.encode_chat(msgs)
        except Exception as e:
            raise bad_request(f"could not render the messages with the model's chat template: {e}", "messages") from None
        asked = p.max_completion_tokens if p.max_completion_tokens is not None else p.max_tokens
        param = "max_completion_tokens" if p.max_completion_tokens is not None else "max_tokens"
        mt = budget(state, len(ids), asked, state.default_max_tokens, param, "messages")
        plan = plan_sampler(p, lm, state.max_n)
        k = (p.top_logprobs or 0) if p.logprobs else None
        run = Run(state, "chatcmpl", [ids], plan, [mt], p.seed, stop, k, bool(p.ignore_eos))
        if p.stream:
            include_usage = bool(p.stream_options and p.stream_options.include_usage)
            return _stream(run, chat_stream(run, include_usage))
        return await _collect(request, run, lambda extras: chat_response(run, extras))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        p, stop = await parse(request, CompletionRequest)
        if p.suffix:
            raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
        if p.best_of is not None and p.best_of != (p.n or 1):
            raise bad_request("best_of must equal n on this server", "best_of", "unsupported_parameter")
        if p.echo and p.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported", "echo", "unsupported_parameter")
        prompts = _prompts(p.prompt)
        if not prompts:
            raise bad_request("prompt must not be empty", "prompt", "invalid_value")
        if len(prompts) > 32:
            raise bad_request(f"at most 32 prompts per request, got {len(prompts)}", "prompt", "invalid_value")
        tok = lm.tokenizer
        ids = []
        for j, pr in enumerate(prompts):
            if isinstance(pr, str):
                ids.append(tok.encode(pr))
            else:
                bad = [t for t in pr if not 0 <= t < tok.vocab_size]
                if bad:
                    raise bad_request(f"token id {bad[0]} in prompt[{j}] is outside the vocabulary "
                                      f"(0..{tok.vocab_size - 1})", "prompt", "invalid_value")
                ids.append(list(pr))
            if not ids[-1]:
                raise bad_request("prompt must not be empty", "prompt", "invalid_value")
        mts = [budget(state, len(x), p.max_tokens, 16, "max_tokens", "prompt") for x in ids]  # OpenAI's default is 16
        plan = plan_sampler(p, lm, state.max_n)
        if len(prompts) * plan.n > 4 * state.max_n:
            raise bad_request("too many prompts times n for one request", "n", "invalid_value")
        echo = [pr if isinstance(pr, str) else tok.decode(pr) for pr in prompts] if p.echo else None
        run = Run(state, "cmpl", ids, plan, mts, p.seed, stop, p.logprobs, bool(p.ignore_eos))
        if p.stream:
            include_usage = bool(p.stream_options and p.stream_options.include_usage)
            return _stream(run, completion_stream(run, include_usage, echo))
        return await _collect(request, run, lambda extras: completion_response(run, echo, extras))

    # -- streaming and collecting ----------------------------------------------------------
    def _stream(run: Run, gen: AsyncIterator[str]):
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except APIError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
            except Exception as e:  # headers are sent: the error can only travel as an event
                log.exception("stream failed")
                yield _sse(APIError(500, f"The server had an error while streaming ({type(e).__name__}).",
                                    "server_error").body())
                yield "data: [DONE]\n\n"
            finally:
                run.cancel()  # a client that went away stops its rows (no-op when they finished)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(request, run: Run, build: Callable[[dict], dict]):
        async def drain():
            async for _ in run.events():
                pass
            return await run.finish()

        task = asyncio.ensure_future(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    extras = task.result()
                    break
                if await request.is_disconnected():
                    run.cancel()
                    task.cancel()
                    return Response(status_code=499)
        finally:
            run.cancel()
            if not task.done():
                task.cancel()
        return build(extras)

    def _base(run: Run, obj: str, rid: str) -> dict[str, Any]:
        return {"id": rid, "object": obj, "created": int(time.time()), "model": lm.name,
                "system_fingerprint": FINGERPRINT}

    def _top_extras(run: Run, extras: dict) -> dict[str, Any]:
        out = dict(extras)
        if run.plan.metrics:
            out["entropix_sampler"] = run.plan.name
            out["entropix_thresholds"] = run.thresholds
        return out

    def chat_response(run: Run, extras: dict) -> dict[str, Any]:
        choices = []
        for i in sorted(run.choices):
            ch = run.choices[i]
            c = {"index": i, "message": {"role": "assistant", "content": ch.text},
                 "logprobs": None, "finish_reason": ch.finish_reason or "length"}
            if run.top_logprobs is not None:
                c["logprobs"] = {"content": [chat_logprob(run.tok, r, run.top_logprobs)
                                             for r in ch.records if not ch.is_stop_token(r)]}
            if run.plan.metrics:
                c["entropix"] = [metric_entry(run.tok, r) for r in ch.records if not ch.is_stop_token(r)]
            c.update(ch.extra)
            choices.append(c)
        return {**_base(run, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}"), "choices": choices,
                "usage": run.usage(), **_top_extras(run, extras)}

    def completion_logprobs(run: Run, recs: list[TokenRecord], offset: int) -> dict[str, Any]:
        k = run.top_logprobs or 0
        tokens, lps, tops, offs = [], [], [], []
        for r in recs:
            piece = run.tok.token_text(r.token)
            tokens.append(piece)
            lps.append(_lp(r.logprob))
            tops.append({s: _lp(lp) for _, s, lp in r.top[:k]} if k else None)
            offs.append(offset)
            offset += len(r.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def completion_response(run: Run, echo: list[str] | None, extras: dict) -> dict[str, Any]:
        choices = []
        for i in sorted(run.choices):
            ch = run.choices[i]
            prefix = echo[ch.prompt_index] if echo else ""
            c = {"index": i, "text": prefix + ch.text, "logprobs": None, "finish_reason": ch.finish_reason or "length"}
            recs = [r for r in ch.records if not ch.is_stop_token(r)]
            if run.top_logprobs is not None:
                c["logprobs"] = completion_logprobs(run, recs, len(prefix))
            if run.plan.metrics:
                c["entropix"] = [metric_entry(run.tok, r) for r in recs]
            c.update(ch.extra)
            choices.append(c)
        return {**_base(run, "text_completion", f"cmpl-{uuid.uuid4().hex}"), "choices": choices,
                "usage": run.usage(), **_top_extras(run, extras)}

    def _defer_finish(run: Run) -> bool:
        return run.plan.kind in ("cot", "self-consistency")  # finish chunks carry the scores, sent at the end

    async def chat_stream(run: Run, include_usage: bool) -> AsyncIterator[str]:
        base = _base(run, "chat.completion.chunk", f"chatcmpl-{uuid.uuid4().hex}")
        u = {"usage": None} if include_usage else {}
        first = {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None} for i in sorted(run.choices)], **u}
        if run.plan.metrics:
            first.update(_top_extras(run, {}))
        yield _sse(first)
        async for ch, rec, delta in run.events():
            stop_tok = ch.is_stop_token(rec)
            c: dict[str, Any] = {"index": ch.index, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}
            if run.top_logprobs is not None and not stop_tok:
                c["logprobs"] = {"content": [chat_logprob(run.tok, rec, run.top_logprobs)]}
            if run.plan.metrics and not stop_tok:
                c["entropix"] = [metric_entry(run.tok, rec)]
            if delta or not stop_tok:
                yield _sse({**base, "choices": [c], **u})
            if rec.finish_reason and not _defer_finish(run):
                yield _sse({**base, "choices": [{"index": ch.index, "delta": {}, "logprobs": None,
                                                  "finish_reason": rec.finish_reason}], **u})
        extras = await run.finish()
        if _defer_finish(run):
            yield _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                              "finish_reason": run.choices[i].finish_reason or "length",
                                              **run.choices[i].extra} for i in sorted(run.choices)],
                        **u, **extras})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"

    async def completion_stream(run: Run, include_usage: bool, echo: list[str] | None) -> AsyncIterator[str]:
        base = _base(run, "text_completion", f"cmpl-{uuid.uuid4().hex}")
        u = {"usage": None} if include_usage else {}
        offsets = {i: 0 for i in run.choices}
        first = dict(base)
        if run.plan.metrics:
            first.update(_top_extras(run, {}))
        if echo:
            for i in sorted(run.choices):
                ch = run.choices[i]
                offsets[i] = len(echo[ch.prompt_index])
                yield _sse({**first, "choices": [{"index": i, "text": echo[ch.prompt_index], "logprobs": None,
                                                   "finish_reason": None}], **u})
        elif run.plan.metrics:
            yield _sse({**first, "choices": [], **u})
        async for ch, rec, delta in run.events():
            stop_tok = ch.is_stop_token(rec)
            c: dict[str, Any] = {"index": ch.index, "text": delta, "logprobs": None, "finish_reason": None}
            if run.top_logprobs is not None and not stop_tok:
                c["logprobs"] = completion_logprobs(run, [rec], offsets.get(ch.index, 0))
            offsets[ch.index] = offsets.get(ch.index, 0) + len(delta)
            if run.plan.metrics and not stop_tok:
                c["entropix"] = [metric_entry(run.tok, rec)]
            if rec.finish_reason and not _defer_finish(run):
                c["finish_reason"] = rec.finish_reason
            if delta or not stop_tok or c["finish_reason"]:
                yield _sse({**base, "choices": [c], **u})
        extras = await run.finish()
        if _defer_finish(run):
            yield _sse({**base, "choices": [{"index": i, "text": "", "logprobs": None,
                                              "finish_reason": run.choices[i].finish_reason or "length",
                                              **run.choices[i].extra} for i in sorted(run.choices)],
                        **u, **extras})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"

    # -- playground ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _default_capture_layers(lm) -> tuple[int, ...]:
    """Attention layers the default entropix profile reads (one engine serves every request)."""
    try:
        from .sampling import make_sampler

        layers = tuple(getattr(make_sampler("entropix", lm=lm), "capture_layers", (-1,)))
        return layers or (-1,)
    except Exception:
        return (-1,)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return []
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


# -- running it ------------------------------------------------------------------------------

class ServerThread:
    """Run an app under uvicorn in a background thread (tests and benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound before the thread starts: no race for a free port
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def cmd_serve(args) -> int:
    import uvicorn

    from .cli import eprint, load

    if not 0 < args.port < 65536:
        raise EntropixError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_rows < 1:
        raise EntropixError(f"--max-rows must be at least 1, got {args.max_rows}")
    key = args.api_key or os.environ.get("ENTROPIX_API_KEY") or None
    # Fail early and clearly when the port is taken (uvicorn would only log it).
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        raise EntropixError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not _is_loopback(args.host) and not key:
        eprint(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
               "(set --api-key or ENTROPIX_API_KEY)")
    lm = load(args)
    app = create_app(lm, api_key=key, max_rows=args.max_rows, cors_origins=args.cors_origin or ())
    eprint(f"entropix server for {lm.name} on http://{args.host}:{args.port} "
           f"(playground at /, API at /v1{', API key required' if key else ''})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register_cli(sub) -> None:
    from .cli import add_model_args

    s = sub.add_parser("serve", help="OpenAI-compatible server and the web playground")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require this bearer key on /v1 (default: $ENTROPIX_API_KEY)")
    s.add_argument("--max-rows", type=int, default=32, help="most sequences decoded in one batch")
    s.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(fn=cmd_serve)

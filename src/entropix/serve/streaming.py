"""Responses: OpenAI's JSON objects and server-sent-event chunks for both completion routes.

Per-token metrics travel in an extra `entropix` field of each choice (one entry per token);
the stop token itself counts in usage but gets neither a logprob nor a metrics entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..decode.records import TokenRecord
from .errors import APIError, server_error
from .inflight import Choice, InFlight, rounded

log = logging.getLogger("entropix.server")

FINGERPRINT = f"entropix-{__version__}"
DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _lp(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's stand-in for -inf


# -- per-token entries ------------------------------------------------------------------------

def metric_entry(tok: Any, rec: TokenRecord) -> dict[str, Any]:
    """The per-token record of the `entropix` field."""
    d: dict[str, Any] = {
        "index": rec.index, "token": rec.token, "piece": tok.token_text(rec.token), "text": rec.text,
        "logprob": rounded(rec.logprob), "entropy": rounded(rec.entropy), "varentropy": rounded(rec.varentropy),
        "margin": rounded(rec.margin), "regime": rec.regime, "state": rec.regime,  # "state": its older name
        "top": [{"token": t, "text": s, "logprob": rounded(lp), "prob": rounded(math.exp(lp)) if math.isfinite(lp)
                 else 0.0} for t, s, lp in rec.top],
    }
    if rec.attn:
        d.update({k: rounded(v) for k, v in rec.attn.items()})
    if getattr(rec, "extra", None):  # a policy's decision quantities (dslider, lookahead)
        d.update({k: rounded(v) for k, v in rec.extra.items()})
    return d


def chat_logprob(tok: Any, rec: TokenRecord, k: int) -> dict[str, Any]:
    return {
        "token": tok.token_text(rec.token), "logprob": _lp(rec.logprob), "bytes": list(tok.token_bytes(rec.token)),
        "top_logprobs": [{"token": s, "logprob": _lp(lp), "bytes": list(tok.token_bytes(t))}
                         for t, s, lp in rec.top[:k]],
    }


def completion_logprobs(run: InFlight, recs: list[TokenRecord], offset: int) -> dict[str, Any]:
    k = run.top_logprobs or 0
    as_ids = getattr(run, "tokens_as_ids", False)  # exact ids for a client that continues from them
    tokens, lps, tops, offs = [], [], [], []
    for r in recs:
        tokens.append(f"token_id:{r.token}" if as_ids else run.tok.token_text(r.token))
        lps.append(_lp(r.logprob))
        tops.append({(f"token_id:{t}" if as_ids else s): _lp(lp) for t, s, lp in r.top[:k]} if k else None)
        offs.append(offset)
        offset += len(r.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


# -- whole responses ----------------------------------------------------------------------------

def _base(run: InFlight, obj: str, prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": run.ctx.lm.name, "system_fingerprint": FINGERPRINT}


def _top_extras(run: InFlight, extras: dict[str, Any]) -> dict[str, Any]:
    out = dict(extras)
    if run.metrics:
        out["entropix_sampler"] = run.decoder.name
        out["entropix_thresholds"] = run.thresholds
    return out


def _finished(run: InFlight) -> list[Choice]:
    return [run.choices[i] for i in sorted(run.choices)]


def chat_response(run: InFlight) -> dict[str, Any]:
    choices = []
    for ch in _finished(run):
        c = {"index": ch.index, "message": {"role": "assistant", "content": ch.text}, "logprobs": None,
             "finish_reason": ch.finish_reason or "length"}
        recs = ch.shown_records
        if run.top_logprobs is not None:
            c["logprobs"] = {"content": [chat_logprob(run.tok, r, run.top_logprobs) for r in recs]}
        if run.metrics:
            c["entropix"] = [metric_entry(run.tok, r) for r in recs]
        choices.append({**c, **ch.extra})
    return {**_base(run, "chat.completion", "chatcmpl"), "choices": choices, "usage": run.usage(),
            **_top_extras(run, run.extras)}


def completion_response(run: InFlight, echo: list[str] | None) -> dict[str, Any]:
    choices = []
    for ch in _finished(run):
        prefix = echo[ch.prompt_index] if echo else ""
        c = {"index": ch.index, "text": prefix + ch.text, "logprobs": None, "finish_reason": ch.finish_reason or "length"}
        recs = ch.shown_records
        if run.top_logprobs is not None:
            c["logprobs"] = completion_logprobs(run, recs, len(prefix))
        if run.metrics:
            c["entropix"] = [metric_entry(run.tok, r) for r in recs]
        choices.append({**c, **ch.extra})
    return {**_base(run, "text_completion", "cmpl"), "choices": choices, "usage": run.usage(),
            **_top_extras(run, run.extras)}


# -- streams ------------------------------------------------------------------------------------

def _last_chunks(run: InFlight, base: dict, u: dict, include_usage: bool, empty: dict) -> list[str]:
    """The deferred finish chunk (with the strategy's scores), the usage chunk and [DONE]."""
    out = []
    if run.deferred:
        out.append(sse({**base, "choices": [{"index": ch.index, **empty, "logprobs": None,
                                              "finish_reason": ch.finish_reason or "length", **ch.extra}
                                             for ch in _finished(run)], **u, **run.extras}))
    if include_usage:
        out.append(sse({**base, "choices": [], "usage": run.usage()}))
    return out + [DONE]


async def chat_stream(run: InFlight, include_usage: bool) -> AsyncIterator[str]:
    base = _base(run, "chat.completion.chunk", "chatcmpl")
    u = {"usage": None} if include_usage else {}
    first = {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in sorted(run.choices)], **u}
    yield sse({**first, **_top_extras(run, {})} if run.metrics else first)
    async for ch, recs, delta in run.events():
        rec, shown = recs[-1], [r for r in recs if not ch.is_stop_token(r)]
        stop_tok = ch.is_stop_token(rec)
        c: dict[str, Any] = {"index": ch.index, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}
        if run.top_logprobs is not None and shown:
            c["logprobs"] = {"content": [chat_logprob(run.tok, r, run.top_logprobs) for r in shown]}
        if run.metrics and shown:
            c["entropix"] = [metric_entry(run.tok, r) for r in shown]
        if delta or not stop_tok:
            yield sse({**base, "choices": [c], **u})
        if rec.finish_reason and not run.deferred:
            yield sse({**base, "choices": [{"index": ch.index, "delta": {}, "logprobs": None,
                                            "finish_reason": rec.finish_reason}], **u})
    for chunk in _last_chunks(run, base, u, include_usage, {"delta": {}}):
        yield chunk


async def completion_stream(run: InFlight, include_usage: bool, echo: list[str] | None) -> AsyncIterator[str]:
    base = _base(run, "text_completion", "cmpl")
    u = {"usage": None} if include_usage else {}
    first = {**base, **_top_extras(run, {})} if run.metrics else base
    offsets = {i: 0 for i in run.choices}
    if echo:
        for ch in _finished(run):
            offsets[ch.index] = len(echo[ch.prompt_index])
            yield sse({**first, "choices": [{"index": ch.index, "text": echo[ch.prompt_index], "logprobs": None,
                                             "finish_reason": None}], **u})
    elif run.metrics:  # the sampler and its thresholds before the first token
        yield sse({**first, "choices": [], **u})
    async for ch, recs, delta in run.events():
        rec, shown = recs[-1], [r for r in recs if not ch.is_stop_token(r)]
        stop_tok = ch.is_stop_token(rec)
        c: dict[str, Any] = {"index": ch.index, "text": delta, "logprobs": None, "finish_reason": None}
        if run.top_logprobs is not None and shown:
            c["logprobs"] = completion_logprobs(run, shown, offsets.get(ch.index, 0))
        offsets[ch.index] = offsets.get(ch.index, 0) + len(delta)
        if run.metrics and shown:
            c["entropix"] = [metric_entry(run.tok, r) for r in shown]
        if rec.finish_reason and not run.deferred:
            c["finish_reason"] = rec.finish_reason
        if delta or not stop_tok or c["finish_reason"]:
            yield sse({**base, "choices": [c], **u})
    for chunk in _last_chunks(run, base, u, include_usage, {"text": ""}):
        yield chunk


# -- sending them -------------------------------------------------------------------------------

def sse_response(run: InFlight, chunks: AsyncIterator[str]):
    """A streamed response; once the headers are sent, an error can only travel as an event."""
    async def body():
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield sse(e.body())
            yield DONE
        except Exception as e:
            log.exception("stream failed")
            yield sse(server_error(f"The server had an error while streaming ({type(e).__name__}).").body())
            yield DONE
        finally:
            run.cancel()  # a client that went away stops its rows (no-op when they finished)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def collect(request, run: InFlight, build: Callable[[], dict[str, Any]]):
    """Run to the end, then build the JSON response; a client that disconnects cancels the run."""
    async def drain():
        async for _ in run.events():
            pass

    task = asyncio.ensure_future(drain())
    try:
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await request.is_disconnected():
                return Response(status_code=499)
        task.result()  # raises the run's APIError, if any
    finally:
        run.cancel()
        if not task.done():
            task.cancel()
    return build()

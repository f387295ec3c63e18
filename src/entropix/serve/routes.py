"""The app: OpenAI's routes, the playground and its info route, over one shared scheduler.

`create_app(lm)` builds a FastAPI app whose /v1/chat/completions and /v1/completions
routes feed one `Scheduler` (continuous batching: concurrent requests decode in the same
engine steps). Every catalogue sampler is reachable through the extra `sampler` field.
The routes read everything from `request.app.state.entropix` (a `ServerContext`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..sampler import catalog
from . import protocol, security, streaming, tokenize
from .errors import install_handlers
from .inflight import open_request
from .scheduler import Scheduler
from .context import ServerContext

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DEFAULT_MAX_BODY = 2 * 1024 * 1024

router = APIRouter()


def _context(request: HTTPRequest) -> ServerContext:
    return request.app.state.entropix


def _authorised(request: HTTPRequest) -> ServerContext:
    ctx = _context(request)
    ctx.check_key(request)
    return ctx


# -- meta routes ----------------------------------------------------------------------------

@router.get("/health")
async def health(request: HTTPRequest):
    ctx = _context(request)  # probes need no key, but only a key holder learns more than the status
    sched = ctx.scheduler
    status = "ok" if sched.alive and not sched.draining else ("stopping" if sched.alive else "stopped")
    if not ctx.key_given(request):
        return {"status": status}
    return {"status": status, "model": ctx.lm.name, "scheduler": sched.stats()}


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.lm.name, "object": "model", "created": ctx.created, "owned_by": "entropix",
            "context_length": ctx.max_context}


@router.get("/v1/models")
async def models(request: HTTPRequest):
    return {"object": "list", "data": [_model_card(_authorised(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: HTTPRequest):
    ctx = _authorised(request)
    ctx.check_model(model_id)
    return _model_card(ctx)


@router.get("/v1/entropix/info")
async def info(request: HTTPRequest):
    """What the playground needs: samplers, thresholds, limits."""
    ctx = _authorised(request)
    thresholds = await asyncio.to_thread(ctx.thresholds)  # the first call reads the profile
    return {"model": ctx.lm.name, "samplers": catalog.names(listed_only=True),
            "sampler_specs": catalog.describe(listed_only=True), "thresholds": thresholds,
            "context_length": ctx.max_context, "max_n": ctx.max_n, "version": __version__,
            "scheduler": ctx.scheduler.stats()}


# -- completions ------------------------------------------------------------------------------

async def _parse(request: HTTPRequest, model_cls):
    """Key, body, schema, model name and the checks both routes share: (ctx, params, stop strings)."""
    ctx = _authorised(request)
    p = protocol.parse_body(await protocol.read_json(request, ctx.max_body), model_cls)
    ctx.check_model(p.model)
    return ctx, p, protocol.check_common(p)


@router.post("/v1/chat/completions")
async def chat_completions(request: HTTPRequest):
    ctx, p, stop = await _parse(request, protocol.ChatRequest)
    protocol.check_chat(p)
    ids = protocol.chat_prompt(p, ctx.lm.tokenizer)
    mt = protocol.chat_budget(p, ctx.max_context, len(ids), ctx.default_max_tokens)
    run = open_request(ctx, p, [ids], [mt], stop, (p.top_logprobs or 0) if p.logprobs else None)
    if p.stream:
        return streaming.sse_response(run, streaming.chat_stream(run, p.include_usage))
    return await streaming.collect(request, run, lambda: streaming.chat_response(run))


@router.post("/v1/completions")
async def completions(request: HTTPRequest):
    ctx, p, stop = await _parse(request, protocol.CompletionRequest)
    protocol.check_completion(p)
    prompts, ids = protocol.completion_prompts(p, ctx.lm.tokenizer)
    mts = [protocol.budget(ctx.max_context, len(x), p.max_tokens, protocol.COMPLETION_DEFAULT_TOKENS,
                           "max_tokens", "prompt") for x in ids]
    run = open_request(ctx, p, ids, mts, stop, p.logprobs)
    run.tokens_as_ids = bool(p.return_tokens_as_token_ids)
    echo = [pr if isinstance(pr, str) else ctx.lm.tokenizer.decode(pr) for pr in prompts] if p.echo else None
    if p.stream:
        return streaming.sse_response(run, streaming.completion_stream(run, p.include_usage, echo))
    return await streaming.collect(request, run, lambda: streaming.completion_response(run, echo))


# -- playground ---------------------------------------------------------------------------------

@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


# The chat page loads nothing but its own scripts and styles, and talks to this origin only.
CHAT_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@router.get("/chat", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC_DIR / "chat.html", media_type="text/html", headers={"Content-Security-Policy": CHAT_CSP})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return Response(status_code=204)


# -- the app --------------------------------------------------------------------------------------

@asynccontextmanager
async def _lifespan(app: FastAPI):
    sched = app.state.scheduler
    sched.start()
    try:
        yield
    finally:
        sched.stop()


def create_app(lm, api_key: str | None = None, *, max_rows: int = 32, max_n: int = 16,
               max_body_bytes: int = DEFAULT_MAX_BODY, default_max_tokens: int = 512,
               max_context: int | None = None, cors_origins: list[str] | tuple[str, ...] = (),
               max_pending: int = 256, allowed_hosts: frozenset[str] | None = security.LOOPBACK,
               prefill_chunk: int | None = None) -> FastAPI:
    """The FastAPI app serving `lm` (its scheduler thread runs while the app is up).

    `allowed_hosts`: Host header names to accept (loopback names by default; None: any)."""
    sched = Scheduler(lm, max_rows=max_rows, max_pending=max_pending, capture_layers=catalog.default_capture_layers(lm),
                      prefill_chunk=prefill_chunk)
    ctx = min(max_context or sched.engine.max_context, sched.engine.max_context)
    app = FastAPI(title="entropix", version=__version__, lifespan=_lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages load from a CDN
    app.state.entropix = ServerContext(lm, sched, api_key or None, min(max_n, max_rows), max_body_bytes,
                                  default_max_tokens, ctx)
    app.state.scheduler = sched
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(security.Guard, hosts=allowed_hosts)  # outermost: refusals carry no CORS headers
    install_handlers(app)
    app.include_router(router)
    app.include_router(tokenize.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

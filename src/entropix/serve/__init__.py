"""The OpenAI-compatible server and the playground (needs the `server` extra: fastapi, uvicorn).

    protocol   request models and the checks on their shape
    errors     APIError in OpenAI's shape, the exception handlers
    scheduler  continuous batching over one host Engine in a thread
    inflight   one API request in flight: decoder, strategy phases, choices, scores
    streaming  JSON responses and server-sent-event chunks
    context    what the routes share (model, scheduler, limits, key)
    routes     create_app and the routes
    thread     ServerThread: uvicorn in a thread (tests, benchmarks)

`entropix serve` itself is entropix/cli/serve.py. Nothing here is imported eagerly, so the CLI
loads without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerThread", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .routes import create_app

        return create_app
    if name == "ServerThread":
        from .thread import ServerThread

        return ServerThread
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

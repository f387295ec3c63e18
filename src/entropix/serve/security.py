"""The outer guard of the app: Host check, JSON-only POST bodies, and no unexpected error
that drops a connection.

- A `Host` header outside the allowed names (loopback ones by default) is refused: a web page
  reached through DNS rebinding sends its own host name, so it cannot reach a loopback server.
- POST bodies must say `application/json`: browsers send text/plain or form bodies across
  origins without a preflight, so any page could otherwise start generations.
- An exception that escapes a route becomes a 500 in OpenAI's shape and is not re-raised, so
  the keep-alive connection stays usable; after the response has started, the stream is cut and
  the server closes the connection.
"""

from __future__ import annotations

import json
import logging
from typing import Iterable

log = logging.getLogger("entropix.server")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
LOOPBACK = frozenset(LOOPBACK_HOSTS)


def host_name(header: str) -> str:
    """The name part of a Host header: without its port, brackets and trailing dot, lower case."""
    h = header.strip().lower()
    if h.startswith("["):  # [::1]:8000
        h = h[1:h.index("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def allowed_hosts(extra: Iterable[str] = (), bind_host: str | None = None) -> frozenset[str] | None:
    """The Host names to accept (None: any): loopback names, the address bound to, and `extra`."""
    names = set(LOOPBACK_HOSTS)
    if bind_host and bind_host not in ("0.0.0.0", "::", ""):
        names.add(host_name(bind_host))
    for e in extra:
        for part in str(e).split(","):
            if part.strip() == "*":
                return None
            if part.strip():
                names.add(host_name(part))
    return frozenset(names)


def _loopback(name: str) -> bool:
    return name.startswith("127.") and name.replace(".", "").isdigit()


def _error_body(status: int, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class Guard:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app, hosts: frozenset[str] | None = LOOPBACK) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        name = host_name(headers.get("host", ""))
        if self.hosts is not None and name not in self.hosts and not _loopback(name):
            return await _send(send, 400, _error_body(400, f"Host '{headers.get('host', '')}' is not allowed on this "
                                                      "server (see --allowed-hosts).", "invalid_host"))
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return await _send(send, 415, _error_body(415, "POST bodies must be sent with Content-Type: "
                                                          f"application/json (got '{ctype or 'none'}').",
                                                          "unsupported_media_type"))
        started = False

        async def watch(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if started:  # part of a response is out: the server closes the connection
                raise
            log.exception("unhandled error")
            await _send(send, 500, _error_body(500, "The server had an error while processing your request "
                                               f"({type(e).__name__}).", None, "server_error"))


async def _send(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

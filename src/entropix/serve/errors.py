"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, for every route."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("entropix.server")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(message: str, code: str | None = None) -> APIError:
    return APIError(500, message, "server_error", None, code)


def _param_name(loc: tuple) -> str:
    """pydantic's error location as OpenAI writes a parameter: messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}


def validation_error(e) -> APIError:
    """The first error of a pydantic ValidationError as one OpenAI-style line."""
    err = e.errors()[0]
    param = _param_name(tuple(err["loc"]))
    kind, msg, got = err["type"], err["msg"], err.get("input")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    msg = msg[0].lower() + msg[1:]
    if kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid", "model_attributes_type"):
        return bad_request(f"Invalid type for '{param}': {msg}, but got "
                           f"{_JSON_TYPES.get(type(got), type(got).__name__)} instead.", param, "invalid_type")
    return bad_request(f"Invalid '{param}': {msg} (got {json.dumps(got)}).", param, "invalid_value")


# -- exception handlers ---------------------------------------------------------------------

async def _api_error(request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


async def _http_error(request, exc):
    """Starlette's own 404 and 405 (unknown route, wrong method) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
    return await _api_error(request, APIError(exc.status_code, msg, "invalid_request_error", None, code))


async def _request_validation_error(request, exc):
    # Our routes parse bodies themselves; this only fires for path or query parameters.
    return await _api_error(request, bad_request(str(exc.errors()[0].get("msg", "invalid request"))))


async def _unhandled(request, exc: Exception):
    log.exception("unhandled error")
    return await _api_error(request, server_error(
        f"The server had an error while processing your request ({type(exc).__name__})."))


def install_handlers(app) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(Exception, _unhandled)

"""`entropix serve`: the OpenAI-compatible API and the playground on one port."""

from __future__ import annotations

import importlib.util
import os
import socket

from .. import EntropixError


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _check_port(host: str, port: int) -> None:
    """Fail early and clearly when the port is taken (uvicorn would only log it)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise EntropixError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _check_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise EntropixError(f"the server needs {', '.join(missing)}: pip install 'entropix[server]'")


def cmd_serve(args) -> int:
    from ..cli import eprint, load

    if not 0 < args.port < 65536:
        raise EntropixError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_rows < 1:
        raise EntropixError(f"--max-rows must be at least 1, got {args.max_rows}")
    _check_extra()
    key = args.api_key or os.environ.get("ENTROPIX_API_KEY") or None
    _check_port(args.host, args.port)
    if not _is_loopback(args.host) and not key:
        eprint(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
               "(set --api-key or ENTROPIX_API_KEY)")
    import uvicorn

    from .routes import create_app

    lm = load(args)
    app = create_app(lm, api_key=key, max_rows=args.max_rows, cors_origins=args.cors_origin or ())
    eprint(f"entropix server for {lm.name} on http://{args.host}:{args.port} "
           f"(playground at /, API at /v1{', API key required' if key else ''})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register_cli(sub) -> None:
    from ..cli import add_model_args

    s = sub.add_parser("serve", help="OpenAI-compatible server and the web playground")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require this bearer key on /v1 (default: $ENTROPIX_API_KEY)")
    s.add_argument("--max-rows", type=int, default=32, help="most sequences decoded in one batch")
    s.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(fn=cmd_serve)

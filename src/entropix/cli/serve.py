"""`entropix serve`: the OpenAI-compatible API and the playground on one port."""

from __future__ import annotations

import importlib.util
import os
import socket

from .. import EntropixError
from .common import add_model_args, eprint, load


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
    if not 0 < args.port < 65536:
        raise EntropixError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_rows < 1:
        raise EntropixError(f"--max-rows must be at least 1, got {args.max_rows}")
    _check_extra()
    key = args.api_key or os.environ.get("ENTROPIX_API_KEY") or None
    _check_port(args.host, args.port)
    if not _is_loopback(args.host) and not key:
        if not args.insecure:
            raise EntropixError(f"refusing to serve on {args.host} without an API key: anyone who can reach it could "
                                "use it (set --api-key or ENTROPIX_API_KEY, or pass --insecure)")
        eprint(f"warning: serving on {args.host} without an API key (--insecure): anyone who can reach it can use it")
    if args.shutdown_timeout < 0:
        raise EntropixError(f"--shutdown-timeout must be at least 0, got {args.shutdown_timeout}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise EntropixError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    import uvicorn

    from ..serve.routes import create_app
    from ..serve.security import allowed_hosts

    if args.upstream:  # CoT, auto and self-consistency over another OpenAI-compatible server
        args.engine, args.base_url = "openai", args.upstream
    lm = load(args)
    hosts = allowed_hosts(args.allowed_hosts or (), args.host)
    app = create_app(lm, api_key=key, max_rows=args.max_rows, cors_origins=args.cors_origin or (),
                     allowed_hosts=hosts, prefill_chunk=args.prefill_chunk)
    eprint(f"entropix server for {lm.name} on http://{args.host}:{args.port} "
           f"(playground at /, chat at /chat, API at /v1{', API key required' if key else ''})")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 2)
    GracefulServer(config, app.state.scheduler, args.shutdown_timeout).run()
    return 0


def _graceful_server():
    import uvicorn

    class Graceful(uvicorn.Server):
        """On SIGTERM or Ctrl-C: stop accepting (uvicorn), let running requests go on for `timeout`
        seconds, then end them (streams get an error event) so that the process exits."""

        def __init__(self, config, scheduler, timeout: float) -> None:
            super().__init__(config)
            self.scheduler, self.timeout = scheduler, timeout

        def handle_exit(self, sig, frame) -> None:
            self.scheduler.drain(self.timeout)
            super().handle_exit(sig, frame)
            # uvicorn would raise the signal again once shut down (exit status -15); a graceful
            # shutdown of the command is a normal exit
            getattr(self, "_captured_signals", []).clear()

    return Graceful


def GracefulServer(config, scheduler, timeout: float):  # noqa: N802 - a class made on first use (uvicorn is optional)
    return _graceful_server()(config, scheduler, timeout)


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server and the web playground")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require this bearer key on /v1 (default: $ENTROPIX_API_KEY)")
    s.add_argument("--max-rows", type=int, default=32, help="most sequences decoded in one batch")
    s.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable; "
                   "default: none)")
    s.add_argument("--allowed-hosts", action="append", metavar="NAMES",
                   help="Host header names to accept besides the loopback ones and --host (comma-separated, "
                        "repeatable; '*' accepts any)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may go on after SIGTERM (default 10)")
    s.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled between two decode steps (default: the backend's)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--upstream", default=None, metavar="URL",
                   help="decode through this OpenAI-compatible server (its .../v1) instead of a model here: "
                        "greedy, cot, auto and self-consistency (key from ENTROPIX_UPSTREAM_API_KEY)")
    s.add_argument("--upstream-model", default=None, help="--upstream: the model to ask (default: its first)")
    s.set_defaults(fn=cmd_serve)

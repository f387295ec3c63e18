"""One long-lived Python process that runs the README's command lines (tests/test_readme_commands.py).

Each line still runs in bash as typed: bash parses the quotes, the `> FILE` redirection and the
globs, and the `entropix` it finds first on PATH is a shim (`client` below) that hands its argv,
its working folder and its stdin/stdout/stderr over a Unix socket to this server. The server runs
that argv, adapted (`adapt`), through `entropix.cli.main` with those three file descriptors as its
own, so a redirected line writes its file and a streamed one its pipe, and the shim exits with the
command's status. What the server keeps between lines is torch and entropix imported and each
model the CLI's `load` built, by its flags: a subprocess per line spent ~3 s of its ~4-8 s on these.

The shim runs this file as `readme_driver.py client SOCK ARGS...`, which imports nothing heavy;
the test starts the server as `readme_driver.py serve SOCK LOG`.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import traceback
from pathlib import Path

MAX_TOKENS = 6  # generate / calibrate / eval: enough to exercise each sampler's decode loop
LIMIT = 1  # eval: problems per run
# cot and auto (generate, eval, bench): two first-token branches instead of 10 (auto: 5) still fork,
# decode rows together, ask each "So the answer is" and choose or aggregate, in a third of the time or less
BRANCHES = "2"
BRANCHING = ("cot", "cot-agg", "auto")
# calibrate: the first 4 of the shipped prompts instead of all 42 (its time is their prefill, ~15 s
# on one thread); written beside the working folder by the driver, which the test reads from there
CALIBRATION_PROMPTS, CALIBRATION_COUNT = "../calibration_prompts.jsonl", 4
# bench: one short run instead of 3 x 128 tokens after a 64-token prompt
BENCH = {"--tokens": "4", "--repeats": "1", "--prompt-tokens": "16"}
# transformers takes ~20 s to read the GGUF: `bench` skips its baseline (`bench --peer` still runs
# it), and `--peer` skips the peak-RSS processes, one per contender, each loading its model again
# (tests/test_quant.py times transformers and measures the processes on a tiny checkpoint)
BENCH_ONLY_OURS = ("--no-transformers",)
BENCH_PEER = ("--no-rss",)


def _set(argv: list[str], flag: str, value: str) -> None:
    """Override FLAG's value, or append it."""
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


def adapt(argv: list[str]) -> list[str]:
    """The argv after `entropix` with the test's small sizes: the line's other flags stay as typed."""
    argv = list(argv)
    sub = argv[0] if argv else ""
    if sub in ("generate", "calibrate", "eval"):
        _set(argv, "--max-tokens", str(MAX_TOKENS))
    if sub == "eval":
        _set(argv, "--limit", str(LIMIT))
    if sub == "calibrate":
        _set(argv, "--prompts", CALIBRATION_PROMPTS)
    samplers = {v for i, v in enumerate(argv[1:], 1) if argv[i - 1] == "--sampler"}
    if sub in ("generate", "eval", "bench") and samplers & set(BRANCHING):
        _set(argv, "--branches", BRANCHES)
    if sub == "bench":
        for flag, value in BENCH.items():
            _set(argv, flag, value)
        argv += [f for f in (BENCH_PEER if "--peer" in argv else BENCH_ONLY_OURS) if f not in argv]
    return argv


# -- the shim's side ----------------------------------------------------------------------------------

def write_shim(folder: Path, sock: Path) -> Path:
    """An executable `entropix` in FOLDER that forwards to the server listening on SOCK."""
    shim = folder / "entropix"
    this = shlex.quote(str(Path(__file__).resolve()))
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {this} client {shlex.quote(str(sock))} "$@"\n')
    shim.chmod(0o755)
    return shim


def client(sock_path: str, argv: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        socket.send_fds(s, [json.dumps({"argv": argv, "cwd": os.getcwd()}).encode()], [0, 1, 2])
        s.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: s.recv(4096), b""))
    if not reply:  # the server died in the command: its own stderr log says why
        print("readme_driver: the server closed the connection without a status", file=sys.stderr)
        return 1
    return json.loads(reply)["rc"]


# -- the server's side --------------------------------------------------------------------------------

def memoise_loads() -> None:
    """Each subcommand's `load` builds a model once per set of model flags; later lines get it back."""
    import importlib

    from entropix.backends.torch.quant import check_mode
    from entropix.cli import common

    real, models = common.load, {}

    def load(args, quiet=False):
        if getattr(args, "engine", "entropix") != "entropix" or getattr(args, "tp", None) not in (None, 1):
            return real(args, quiet)  # other engines and tensor-parallel ranks are not shared
        key = (args.model, getattr(args, "backend", "torch"), args.device, args.dtype, getattr(args, "quant", None),
               getattr(args, "dp", 1))
        if key not in models:
            models[key] = real(args, quiet)  # the CLI's own load, under the line's flags
        elif hasattr(args, "quant"):
            args.quant = check_mode(args.quant)  # as the real load leaves it
        return models[key]

    for sub in ("generate", "chat", "eval", "calibrate", "bench"):
        importlib.import_module(f"entropix.cli.{sub}").load = load


def calibration_prompts(cwd: str) -> None:
    """The head of the shipped calibration set, where the adapted calibrate line reads it."""
    from entropix.evaluate.calibrate import PROMPTS_PATH

    path = Path(cwd, CALIBRATION_PROMPTS)
    if not path.exists():
        head = [ln for ln in PROMPTS_PATH.read_text(encoding="utf-8").splitlines() if ln.strip()][:CALIBRATION_COUNT]
        path.write_text("".join(ln + "\n" for ln in head), encoding="utf-8")


def run_one(main, argv: list[str], cwd: str, fds: list[int]) -> int:
    """MAIN(argv) in CWD with FDS as its stdin, stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(i) for i in (0, 1, 2)]
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(cwd)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in enumerate(saved):
            os.dup2(fd, target)
            os.close(fd)
    return rc


def serve(sock_path: str, log_path: str) -> None:
    parent = os.getppid()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)  # before the imports: a shim started meanwhile waits in the backlog
    srv.listen(4)
    srv.settimeout(2)
    from entropix.cli import main

    memoise_loads()
    while os.getppid() == parent:  # a test process that died without stopping it leaves no server behind
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            try:
                rc = handle(conn, main, log_path)
            except Exception:  # the driver's own failure: this line fails, the next ones still run
                traceback.print_exc()
                rc = 1
            conn.sendall(json.dumps({"rc": rc}).encode())


def handle(conn: socket.socket, main, log_path: str) -> int:
    """One shim's command: adapt its argv, run it on its file descriptors, log what ran."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    req = json.loads(msg)
    try:
        argv = adapt(req["argv"])
        if argv[:1] == ["calibrate"]:
            calibration_prompts(req["cwd"])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    rc = run_one(main, argv, req["cwd"], fds)
    with open(log_path, "a", encoding="utf-8") as log:  # what the test compares with the line
        log.write(json.dumps({"typed": req["argv"], "argv": argv, "cwd": req["cwd"], "rc": rc}) + "\n")
    return rc


if __name__ == "__main__":
    if sys.argv[1] == "client":
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    serve(sys.argv[2], sys.argv[3])

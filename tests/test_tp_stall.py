"""A tensor-parallel rank that stalls without dying (SIGSTOP) would hold rank 0 in a gloo collective
for ever: the heartbeats (backends/peers.py) make the server answer 503 naming it within
--peer-timeout, and then stop with its ranks; a stalled rank 0 makes its ranks exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from entropix.backends.torch.ranks import EXIT_GRACE_S, EXIT_STATUS
from test_tp import ENTROPIX, _children, _post
from tiny import write_hf_model

pytestmark = pytest.mark.slow  # a server and its ranks as processes

PEER_TIMEOUT = 5.0
SLACK = 4.0  # a busy machine's scheduling, on top of the timeout and the exit grace


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, gguf_path):
    return write_hf_model(tmp_path_factory.mktemp("tp_stall") / "gqa", gguf_path, seed=5, hidden_size=64,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=160)


def _gone(pid: int) -> bool:
    """Whether a process has ended: no longer there, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _serve(folder: Path) -> tuple[subprocess.Popen, str, str]:
    """`entropix serve --tp 2 --peer-timeout 5` on a free local port, once it answers: (process, base URL, model)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(ENTROPIX + ["serve", "--model", str(folder), "--tp", "2", "--port", str(port),
                                          "--host", "127.0.0.1", "--device", "cpu", "--log-level", "warning",
                                          "--peer-timeout", str(PEER_TIMEOUT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(server.stderr.read().decode())
            time.sleep(0.2)
    name = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
    return server, base, name


def _end(*pids: int) -> None:
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)  # ends a stopped process too


def test_a_stalled_rank_makes_the_server_answer_503_naming_it_and_stop(model_folder):
    server, base, name = _serve(model_folder)
    chat = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    (rank1,) = _children(server.pid)
    try:
        status, body = _post(base + "/v1/chat/completions", chat)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 8
        os.kill(rank1, signal.SIGSTOP)
        t0 = time.monotonic()
        status, body = _post(base + "/v1/chat/completions", chat, timeout=60)
        elapsed = time.monotonic() - t0
        err = json.loads(body)["error"]
        assert status == 503 and err["code"] == "backend_unavailable", body
        assert "tensor-parallel rank 1 stopped answering (no heartbeat for 5.0 s)" in err["message"]
        assert elapsed <= PEER_TIMEOUT + SLACK, elapsed
        t1 = time.monotonic()
        assert server.wait(EXIT_GRACE_S + SLACK) == EXIT_STATUS  # it stops by itself, not hanging
        assert _wait_gone(rank1, SLACK), "the stalled rank was left behind"
        assert time.monotonic() - t1 <= EXIT_GRACE_S + SLACK
        assert "rank 1 stopped answering" in server.stderr.read().decode()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        _end(rank1)


def test_a_stalled_rank_0_makes_its_ranks_exit(model_folder):
    server, base, name = _serve(model_folder)
    (rank1,) = _children(server.pid)
    try:
        server.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert _wait_gone(rank1, PEER_TIMEOUT + SLACK), "rank 1 still waits on a stalled rank 0"
        assert PEER_TIMEOUT * 0.5 <= time.monotonic() - t0  # the heartbeat timed out: nothing else ended it
        server.send_signal(signal.SIGCONT)  # it reaps its rank and learns what it said
        assert server.wait(EXIT_GRACE_S + SLACK) == EXIT_STATUS  # its rank gone, it stops too
        err = server.stderr.read().decode()
        assert "rank 1: rank 0 stopped answering (no heartbeat for 5.0 s); stopping" in err
    finally:
        server.send_signal(signal.SIGCONT)
        if server.poll() is None:
            server.kill()
            server.wait(10)
        _end(rank1)


def test_generate_with_a_stalled_rank_fails_in_one_line_instead_of_hanging(model_folder):
    """The stall lands while the tokens are decoded (the model's 256 positions take a few seconds)."""
    cmd = ENTROPIX + ["generate", "Once upon a time", "--model", str(model_folder), "--tp", "2", "--device", "cpu",
                      "--raw", "--no-color", "--max-tokens", "250", "--peer-timeout", str(PEER_TIMEOUT)]
    gen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rank1 = None
    try:
        while not (line := gen.stderr.readline()).startswith("loaded"):
            assert line, "generate ended before its model loaded"
        (rank1,) = _children(gen.pid)
        os.kill(rank1, signal.SIGSTOP)
        t0 = time.monotonic()
        assert gen.wait(PEER_TIMEOUT + SLACK) != 0
        assert time.monotonic() - t0 <= PEER_TIMEOUT + SLACK
        err = gen.stderr.read().strip().splitlines()
        assert err[-1] == "entropix: error: tensor-parallel rank 1 stopped answering (no heartbeat for 5.0 s)", err
        assert _wait_gone(rank1, SLACK)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(10)
        if rank1 is not None:
            _end(rank1)


@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_a_bad_peer_timeout_is_a_one_line_error(model_folder, capsys, value):
    from entropix.cli import main

    assert main(["generate", "hi", "--model", str(model_folder), "--tp", "2", "--peer-timeout", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"entropix: error: --peer-timeout must be a number of seconds above 0, got {float(value)}"

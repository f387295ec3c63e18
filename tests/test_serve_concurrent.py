"""`entropix serve` as users start it, with requests that arrive together.

The server runs as a subprocess of the installed `entropix` script on the embedded model, with
no --quant flag (the default weight mode, which gives this file int4 projections) and no ENTROPIX_*
variable. Every weight mode (none, int8, int4) serves concurrent ragged requests, chunked prefill
and auto in-process on tiny models: tests/test_quant_modes.py. Two chat requests whose prompts differ clearly in length are sent at the same moment,
so the scheduler decodes them in one batch of unequal rows; both must succeed. A `sampler:
auto` request long enough to reach its CoT vote must succeed as well.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # end to end on the embedded model (make test-fast leaves it out)

START_TIMEOUT = 300  # seconds for the model load and the first /health answer
REQUEST_TIMEOUT = 300

SHORT = "Hi!"
LONG = (
    "I am planning a week-long trip through the mountains with two friends. We will walk about "
    "fifteen kilometres a day, sleep in huts, and carry our own food for the first three days. "
    "One friend has never hiked at altitude before and the other worries about the weather, "
    "which can change quickly in late September. We want to pack light but stay safe. Please "
    "think about water, layers of clothing, navigation, first aid and what to do if a storm "
    "arrives in the afternoon, and then tell me the single most important thing to bring."
)


def entropix_exe() -> list[str]:
    script = Path(sys.executable).parent / ("entropix.exe" if os.name == "nt" else "entropix")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "entropix.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        # The defaults a user gets: no ENTROPIX_* variable (ENTROPIX_API_KEY would demand a key,
        # ENTROPIX_QUANT would change the weight mode).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENTROPIX_")}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(entropix_exe() + ["serve", "--host", "127.0.0.1", "--port", str(self.port)] + extra,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"entropix serve exited with {self.proc.returncode} before answering /health:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return
            except httpx.TransportError:
                pass  # not listening yet: the model is still loading
            time.sleep(0.5)
        pytest.fail(f"entropix serve did not answer /health within {START_TIMEOUT}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server([], tmp_path_factory.mktemp("serve") / "server.log")
    try:
        srv.wait_ready()
        models = httpx.get(srv.url + "/v1/models", timeout=30)
        assert models.status_code == 200, models.text
        srv.model = models.json()["data"][0]["id"]
        yield srv
    finally:
        srv.stop()


def chat(srv: Server, prompt: str, **extra) -> httpx.Response:
    body = {"model": srv.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0,
            **extra}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT)


def check_reply(srv: Server, r: httpx.Response, what: str) -> dict:
    assert r.status_code == 200, f"{what}: HTTP {r.status_code} {r.text[:500]}\nserver log:\n{srv.log_tail()}"
    body = r.json()
    content = body["choices"][0]["message"]["content"]
    assert isinstance(content, str) and content.strip(), f"{what}: empty content in {body}"
    return body


def test_two_concurrent_chats_of_different_lengths(server):
    prompts = {"short": SHORT, "long": LONG}
    replies: dict[str, httpx.Response | BaseException] = {}
    # Both threads post at the same moment, so the scheduler puts the two rows in one batch.
    barrier = threading.Barrier(len(prompts))

    def send(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            replies[name] = chat(server, prompts[name])
        except BaseException as e:  # reported below, with the server log
            replies[name] = e

    threads = [threading.Thread(target=send, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT + 60)
    assert set(replies) == set(prompts), f"requests did not finish: {set(prompts) - set(replies)}"
    usage = {}
    for name, r in replies.items():
        assert not isinstance(r, BaseException), f"{name} request raised {r!r}\nserver log:\n{server.log_tail()}"
        usage[name] = check_reply(server, r, f"{name} prompt")["usage"]["prompt_tokens"]
    # the rows really differ in length (the case that needs padding or separate caches)
    assert usage["long"] > 4 * usage["short"], usage


def test_auto_sampler_request(server):
    # 40 tokens leave room for an answer, so auto's confidence check (and CoT vote) runs
    r = chat(server, "Which is larger: 9.9 or 9.11?", max_tokens=40, sampler="auto")
    check_reply(server, r, "sampler auto")

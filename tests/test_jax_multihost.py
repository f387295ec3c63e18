"""The JAX backend over a job of 2 processes x 2 forced host devices, as a pod slice's hosts
would run it (here on one machine, gloo between the processes): the same command in every
process, process 0 alone printing and serving, greedy and entropix tokens equal to one
device's, each process reading only its part of the checkpoint, and a killed process giving
503 naming it with both processes gone within the timeout."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tiny import write_hf_model

pytestmark = pytest.mark.slow  # several JAX processes per test (make test-fast leaves it out)

HERE = Path(__file__).parent
ENTROPIX = str(Path(sys.executable).with_name("entropix"))
PROMPT = "Write a short story about a robot who learns to paint."
TOKENS = 32
PEER_TIMEOUT = 10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_PLATFORMS", None)
    return env


def _job_args(i: int, port: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]


def _job(argv: list[str], timeout: float = 600) -> list[tuple[int, str, str]]:
    """The same command in 2 processes of one job: (exit status, stdout, stderr) of each."""
    port = _port()
    procs = [subprocess.Popen(argv + _job_args(i, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _generate(*extra: str) -> list[str]:
    return [ENTROPIX, "generate", PROMPT, "--backend", "jax", "--device", "cpu", "--max-tokens", str(TOKENS),
            "--json", *extra]


def _states(run: dict) -> list[str]:
    return [r["state"] for r in run["records"]]


@pytest.fixture(scope="module")
def one_device() -> dict:
    """Greedy and entropix (seed 7) on one device, in one process without forced devices."""
    env = dict(_env())
    env.pop("XLA_FLAGS")
    out = {}
    for name, extra in (("greedy", ()), ("entropix", ("--sampler", "entropix", "--seed", "7"))):
        p = subprocess.run(_generate(*extra), capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        out[name] = json.loads(p.stdout)
    assert len(out["greedy"]["tokens"]) == TOKENS  # the whole budget: no early stop to hide a difference
    return out


def _job_json(argv: list[str]) -> dict:
    (rc0, out0, err0), (rc1, out1, err1) = _job(argv)
    assert rc0 == 0, err0[-2000:]
    assert rc1 == 0, err1[-2000:]
    assert out1 == ""  # only process 0 prints
    assert "Traceback" not in err0 + err1
    return json.loads(out0)


def readme_lines() -> list[str]:
    """The ```bash block under "How the CPU tests stand for it" in the README's JAX section."""
    text = (HERE.parent / "README.md").read_text()
    m = re.search(r"How the CPU tests stand for it.*?```bash\n(.*?)^```", text, re.M | re.S)
    assert m, "README.md lost its block of 2-process CPU commands"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_lines_run_a_job_whose_greedy_tokens_equal_one_device(one_device, tmp_path):
    """The README's lines as typed (their coordinator port made free): process 1 in the
    background, process 0 printing the answer."""
    lines = readme_lines()
    assert len(lines) == 3 and lines[0].startswith("export XLA_FLAGS=")
    script = "\n".join(lines).replace("127.0.0.1:8476", f"127.0.0.1:{_port()}") + "\nwait $!\n"  # process 1 exits 0 too
    env = dict(_env(), PATH=os.pathsep.join([str(Path(ENTROPIX).parent), os.environ["PATH"]]))
    env.pop("XLA_FLAGS")  # the README's export sets it
    p = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    run = json.loads(p.stdout)  # process 0's answer alone: process 1 prints nothing
    assert run["tokens"] == one_device["greedy"]["tokens"]


def test_entropix_over_tp4_equals_one_device(one_device):
    ent = _job_json(_generate("--tp", "4", "--sampler", "entropix", "--seed", "7"))
    _same_entropix(ent, one_device["entropix"])


def test_tp2_dp2_equals_one_device(one_device):
    greedy = _job_json(_generate("--tp", "2", "--dp", "2"))
    assert greedy["tokens"] == one_device["greedy"]["tokens"]
    _same_entropix(_job_json(_generate("--tp", "2", "--dp", "2", "--sampler", "entropix", "--seed", "7")),
                   one_device["entropix"])


def _same_entropix(run: dict, one: dict) -> None:
    assert run["tokens"] == one["tokens"]
    assert _states(run) == _states(one)
    assert len(set(_states(one))) > 1  # the seed's run goes through several regimes
    np.testing.assert_allclose([r["entropy"] for r in run["records"]], [r["entropy"] for r in one["records"]],
                               atol=1e-3)


def test_each_process_reads_only_its_part_of_the_checkpoint(tmp_path, gguf_path):
    """tp=4 over 2 processes of 2 devices: each process holds tp shards 2i and 2i+1, so it reads
    half of every weight the mesh splits and the whole of what it keeps whole (norms)."""
    from entropix.backends.jax.loader import expected_shapes
    from entropix.backends.jax.sharding import param_spec
    from entropix.io.checkpoint import open_path

    folder = write_hf_model(tmp_path / "tiny", gguf_path, seed=3, hidden_size=64, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=8, intermediate_size=128)
    argv = [sys.executable, str(HERE / "jax_multihost_load.py"), str(folder)]
    port = _port()
    procs = [subprocess.Popen(argv + [f"127.0.0.1:{port}", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env()) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    reads = {r["process"]: r["read"] for r in (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)}
    ckpt = open_path(folder)
    cfg = ckpt.config
    split = whole = 0
    for name, shape in expected_shapes(cfg).items():
        full = int(np.prod(shape)) * 4  # fp32 on disk
        part = full // 2 if any(param_spec(name, shape, 4)) else full
        split += full - part
        whole += part
        for i in (0, 1):
            assert reads[i][name + ".weight"] == part, (i, name)
    assert split > 0 and whole < sum(int(np.prod(s)) * 4 for s in expected_shapes(cfg).values())


def _get(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_up(base: str, procs: list[subprocess.Popen]) -> None:
    for _ in range(900):
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            return
        except OSError:
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def _concurrent_equal_alone(base: str, name: str) -> None:
    """Ragged prompts, a seeded n=2 and a CoT request (forks) at once: each gets what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"model": name, "prompt": p, "max_tokens": 12, "temperature": 0} for p in ("Hi", PROMPT)]
    bodies.append({"model": name, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.8, "seed": 3, "n": 2})
    bodies.append({"model": name, "prompt": "What is 12 + 7?", "max_tokens": 12, "sampler": "cot", "branches": 3})

    def texts(body: dict) -> list[str]:
        status, raw = _get(base + "/v1/completions", body)
        assert status == 200, raw
        return [c["text"] for c in json.loads(raw)["choices"]]

    alone = [texts(b) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(texts, bodies))
    assert together == alone
    assert len(alone[2]) == 2 and len(alone[3]) >= 1


def test_serve_across_processes_and_a_killed_process_gives_503(one_device):
    """Process 0 serves (plain and streamed, greedy as one device decodes it; concurrent requests as
    they decode alone); process 1 killed:
    the next request gets 503 naming it, and process 0 exits within the timeout."""
    http, port = _port(), _port()
    argv = [ENTROPIX, "serve", "--backend", "jax", "--device", "cpu", "--tp", "2", "--dp", "2", "--port", str(http),
            "--peer-timeout", str(PEER_TIMEOUT), "--log-level", "warning"]
    procs = [subprocess.Popen(argv + _job_args(i, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in range(2)]
    base = f"http://127.0.0.1:{http}"
    try:
        _wait_up(base, procs)
        name = json.loads(_get(base + "/v1/models")[1])["data"][0]["id"]
        body = {"model": name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0}
        status, plain = _get(base + "/v1/chat/completions", body)
        assert status == 200
        text = json.loads(plain)["choices"][0]["message"]["content"]
        assert text == "".join(r["text"] for r in one_device["greedy"]["records"][:16])
        status, streamed = _get(base + "/v1/chat/completions", dict(body, stream=True))
        chunks = [json.loads(line[6:]) for line in streamed.decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert status == 200
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
        _concurrent_equal_alone(base, name)
        procs[1].kill()
        t0 = time.monotonic()
        status, err = _get(base + "/v1/chat/completions", body, timeout=60)
        assert status == 503, err
        assert "process 1" in json.loads(err)["error"]["message"]
        assert procs[0].wait(PEER_TIMEOUT + 10) == 3  # not hanging: it stops by itself
        assert time.monotonic() - t0 < PEER_TIMEOUT + 10
        err0, err1 = procs[0].stderr.read(), procs[1].stderr.read()
        assert "process 1 is gone" in err0
        assert "jax on cpu x4 (dp=2, tp=2) over 2 processes" in err0  # the mesh spans both processes
        assert "loading model" not in err1  # only process 0 prints
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

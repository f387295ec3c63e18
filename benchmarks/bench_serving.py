"""vLLM against `entropix serve` on the same Hugging Face folder and dtype, in one run, in turn.

Each server is started alone (the other stopped), given the same threads, warmed up with every
stream count once, then timed: S concurrent streamed `/v1/completions` requests of T tokens
(temperature 0, `ignore_eos`, each its own prompt) for S in --streams; per S the aggregate decode
tokens/s (tokens after each stream's first / the time from the first first token to the last token)
and the median time to first token. Then ours again in our best CPU mode on the embedded GGUF
(--quant auto: int4) when --embedded is given. Prints one JSON object with ratios to vLLM.

vLLM comes from `.venv-vllm` (`make install-vllm`); the folder from `entropix export --out FOLDER
--dtype float32`.

    python benchmarks/bench_serving.py FOLDER [--streams 1,8,32] [--tokens 128] [--threads 2]
        [--ours-flags "--quant none --compile"] [--embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the printing press", "bread", "the solar system", "a fisherman's morning", "photosynthesis", "the sea",
          "a mountain village", "old clocks"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(folder: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "OMP_NUM_THREADS": str(threads)}
    cmd = [str(ROOT / ".venv-vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), \
        f"http://127.0.0.1:{port}"


def start_ours(model: str, threads: int, flags: str) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [str(ROOT / ".venv/bin/entropix"), "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *shlex.split(flags)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), \
        f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, name: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"{name}'s server ended before it answered")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"{name}'s server did not answer in 10 minutes")


async def stream(client: httpx.AsyncClient, i: int, tokens: int) -> tuple[float, list[float]]:
    """(request start, arrival time of each streamed token chunk)."""
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    body = {"model": model, "prompt": f"Write about {TOPICS[i % len(TOPICS)]} (note {i}):", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    t0, arrivals = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text = json.loads(line[6:])["choices"][0].get("text", "")
                if text:
                    arrivals.append(time.perf_counter())
    return t0, arrivals


async def load(url: str, streams: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1200,
                                 limits=httpx.Limits(max_connections=streams + 4)) as client:
        runs = await asyncio.gather(*(stream(client, i, tokens) for i in range(streams)))
    first = min(a[0] for _, a in runs if a)
    last = max(a[-1] for _, a in runs if a)
    decoded = sum(len(a) - 1 for _, a in runs)
    return {"streams": streams, "tps": round(decoded / max(last - first, 1e-9), 2),
            "ttft_s": round(statistics.median(a[0] - t0 for t0, a in runs if a), 3),
            "chunks": sum(len(a) for _, a in runs)}


def measure(name: str, started: tuple[subprocess.Popen, str], streams: list[int], tokens: int) -> dict:
    proc, url = started
    t = time.perf_counter()
    try:
        wait_ready(proc, url, name)
        ready_s = time.perf_counter() - t
        for s in streams:  # warm-up: every batch size once (a compiled step compiles here)
            asyncio.run(load(url, s, 8))
        return {"ready_s": round(ready_s, 1), "runs": [asyncio.run(load(url, s, tokens)) for s in streams]}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-flags", default="--quant none --compile")
    ap.add_argument("--embedded", action="store_true", help="also ours on the embedded GGUF, --compile, int4")
    ap.add_argument("--no-vllm", action="store_true", help="ours alone (no ratios)")
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    out: dict = {"folder": a.folder, "threads": a.threads, "tokens": a.tokens, "cpu_count": os.cpu_count()}
    if not a.no_vllm:
        out["vllm"] = measure("vLLM", start_vllm(a.folder, a.threads), streams, a.tokens)
    out["ours"] = measure("entropix", start_ours(a.folder, a.threads, a.ours_flags), streams, a.tokens)
    out["ours_flags"] = a.ours_flags
    if a.embedded:
        out["ours_embedded"] = measure("entropix", start_ours("default", a.threads, "--compile"), streams, a.tokens)
    for key in ("ours", "ours_embedded"):
        if key in out and "vllm" in out:
            out[f"{key}_vs_vllm"] = {r["streams"]: {"tps": round(r["tps"] / v["tps"], 3),
                                                    "ttft": round(r["ttft_s"] / max(v["ttft_s"], 1e-9), 3)}
                                     for r, v in zip(out[key]["runs"], out["vllm"]["runs"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

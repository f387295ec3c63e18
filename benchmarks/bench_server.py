"""Server throughput: the same streaming requests one after another, then all at once.

Starts `entropix serve` in a subprocess on a free loopback port, sends N greedy
streaming completions (raw prompts, `ignore_eos` so every request decodes exactly
--tokens tokens) sequentially, then the same N concurrently, and prints one JSON
object with both aggregate tokens/s and their ratio. Concurrent requests share the
engine's decode steps (continuous batching), so the ratio shows what batching buys.

Usage: python benchmarks/bench_server.py [--requests 8] [--tokens 64] [--model M] [--backend torch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "The history of the printing press begins",
    "A recipe for bread starts with flour,",
    "The three largest planets of the solar system are",
    "In the morning the fisherman walked down to the harbour and",
    "Photosynthesis is the process by which plants",
    "The rules of chess say that a knight moves",
    "When the train left the station, the passengers",
    "A good night's sleep helps the brain because",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, model: str | None, device: str, backend: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "entropix.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--device", device, "--backend", backend]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


async def one(client: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> dict:
    """One streaming completion: tokens received, time to first token, wall time."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("error"):
                raise SystemExit(f"stream error: {ev['error']}")
            if first is None and any(c.get("text") for c in ev.get("choices", [])):
                first = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
    return {"tokens": usage["completion_tokens"], "ttft": first, "seconds": time.perf_counter() - t0}


def summary(results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "mean_ttft_s": round(sum(r["ttft"] or 0 for r in results) / len(results), 3)}


async def bench(url: str, n: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await one(client, model, "Warm-up:", 4)  # first-call costs stay out of both figures
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

        t0 = time.perf_counter()
        seq = [await one(client, model, p, tokens) for p in prompts]
        seq_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        conc = await asyncio.gather(*[one(client, model, p, tokens) for p in prompts])
        conc_s = time.perf_counter() - t0
        health = (await client.get("/health")).json()

    s, c = summary(seq, seq_s), summary(list(conc), conc_s)
    return {"model": model, "requests": n, "tokens_per_request": tokens, "sequential": s, "concurrent": c,
            "ratio": round(c["tokens_per_s"] / s["tokens_per_s"], 2),
            "max_batch_rows": health["scheduler"]["max_batch_rows"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        proc = start_server(port, args.model, args.device, args.backend)
        url = f"http://127.0.0.1:{port}"
    try:
        result = asyncio.run(bench(url, args.requests, args.tokens))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

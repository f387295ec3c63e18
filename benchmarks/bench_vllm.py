"""vLLM with the entropix logits processor, in one run against vLLM's own greedy.

Starts vLLM's OpenAI server (from `.venv-vllm`: `make install-vllm`) on a Hugging Face folder
(`entropix export --out FOLDER`) with the processor loaded, then measures:
- decode tokens/s of R concurrent requests of T tokens: greedy (no `vllm_xargs`: the processor
  leaves the batch alone) and entropix on every row; their ratio;
- the wall time of CoT with 10 branches over that server (`entropix generate --engine openai`)
  against one greedy request of the same length.
Prints one JSON object.

    python benchmarks/bench_vllm.py FOLDER [--rows 16] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explain in a few sentences why the sky is blue."


def start(folder: str, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(threads)}
    cmd = [str(ROOT / ".venv-vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--enforce-eager", "--logits-processors", "entropix.adapters.vllm:EntropixLogitsProcessor"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit("vLLM's server ended before it answered")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("vLLM's server did not answer in 10 minutes")


def one(url: str, model: str, tokens: int, xargs: dict | None) -> int:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if xargs:
        body["vllm_xargs"] = xargs
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def batch_tps(url: str, model: str, rows: int, tokens: int, entropix: bool) -> float:
    jobs = [{"entropix_sampler": "entropix", "entropix_seed": i} if entropix else None for i in range(rows)]
    t = time.perf_counter()
    with ThreadPoolExecutor(rows) as pool:
        done = sum(pool.map(lambda x: one(url, model, tokens, x), jobs))
    return done / (time.perf_counter() - t)


def cot_seconds(url: str, tokens: int, branches: int) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "entropix.cli", "generate", PROMPT, "--engine", "openai", "--base-url",
                    url + "/v1", "--sampler", "cot", "--branches", str(branches), "--max-tokens", str(tokens),
                    "--json"], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    proc, url = start(args.folder, args.threads)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        one(url, model, 8, None)  # warm
        one(url, model, 8, {"entropix_sampler": "entropix", "entropix_seed": 0})
        greedy = batch_tps(url, model, args.rows, args.tokens, False)
        ent = batch_tps(url, model, args.rows, args.tokens, True)
        t = time.perf_counter()
        one(url, model, args.tokens, None)
        single = time.perf_counter() - t
        cot = cot_seconds(url, args.tokens, 10)
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps({"rows": args.rows, "tokens": args.tokens, "threads": args.threads,
                      "greedy_tps": round(greedy, 2), "entropix_tps": round(ent, 2),
                      "entropix_vs_greedy": round(ent / greedy, 3), "greedy_request_s": round(single, 2),
                      "cot10_s": round(cot, 2), "cot10_vs_greedy_request": round(cot / single, 2)}))


if __name__ == "__main__":
    main()

"""The server under load: throughput, a long prompt among running streams, cancels, a queue.

Starts `entropix serve` in a subprocess on a free loopback port and prints one JSON object
with one section per scenario (figures, not asserts; each target is reported with `met`):

- throughput: one greedy stream alone, then --streams concurrent ones (raw prompts, `ignore_eos`
  so each decodes exactly --tokens tokens): failures and the aggregate tokens/s ratio (target 4x).
- long: --running streams decode while a --long-tokens prompt arrives; the longest gap between
  tokens of a running stream while that prompt is prefilled (target 2 s) and its time to first token.
- cancel: --streams streams at a KV capacity of 2048 (one of them has a 1,900-token prompt, and
  the cache holds every row at the longest's capacity); half are closed at once. The engine time
  the cancels took (the scheduler's `cancel_seconds`, target 0.1 s) and the survivors' gaps.
- queue: 2 x --streams streams over a --streams row limit: all must finish (queued, not refused).
- chunks: no server; prefill time per chunk size at a few context offsets (how the default
  chunk size was chosen).

Usage: python benchmarks/bench_server.py [--scenario all|throughput|long|cancel|queue|chunks]
       [--streams 32] [--tokens 32] [--long-tokens 7500] [--running 2] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
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


def start_server(port: int, args, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "entropix.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--device", args.device, "--backend", args.backend, *extra]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 600 s")


async def stream(client: httpx.AsyncClient, body: dict, times: list[float] | None = None,
                 stop: asyncio.Event | None = None) -> dict:
    """One streaming completion; token arrival times go to `times`; `stop` closes it early."""
    body = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **body}
    t0 = time.perf_counter()
    first, usage, got = None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("error"):
                return {"error": ev["error"]["message"]}
            if any(c.get("text") is not None for c in ev.get("choices", [])):
                now = time.perf_counter()
                first = first if first is not None else now - t0
                got += 1
                if times is not None:
                    times.append(now)
            if ev.get("usage"):
                usage = ev["usage"]
            if stop is not None and stop.is_set():
                return {"tokens": got, "ttft": first, "seconds": time.perf_counter() - t0, "closed": True}
    return {"tokens": usage["completion_tokens"] if usage else got, "ttft": first,
            "seconds": time.perf_counter() - t0}


def _max_gap(times: list[float], lo: float, hi: float) -> float:
    """The longest wait for a token between lo and hi (from lo to the first token counts too)."""
    pts = [lo] + [t for t in times if lo < t <= hi] + [hi]
    return max(b - a for a, b in zip(pts, pts[1:]))


async def throughput(client, model: str, streams: int, tokens: int) -> dict:
    alone = await stream(client, {"model": model, "prompt": PROMPTS[0], "max_tokens": tokens})
    t0 = time.perf_counter()
    res = await asyncio.gather(*[stream(client, {"model": model, "prompt": PROMPTS[i % 8], "max_tokens": tokens})
                                 for i in range(streams)])
    secs = time.perf_counter() - t0
    fails = [r for r in res if "error" in r or r["tokens"] != tokens]
    one = alone["tokens"] / alone["seconds"]
    agg = sum(r.get("tokens", 0) for r in res) / secs
    return {"streams": streams, "tokens_per_stream": tokens, "failures": len(fails), "one_stream_tok_s": round(one, 2),
            "aggregate_tok_s": round(agg, 2), "ratio": round(agg / one, 2), "seconds": round(secs, 1),
            "met": not fails and agg >= 4 * one}


async def long_prompt(client, model: str, running: int, long_tokens: int) -> dict:
    times: list[list[float]] = [[] for _ in range(running)]
    stop = asyncio.Event()
    runs = [asyncio.create_task(stream(client, {"model": model, "prompt": PROMPTS[i % 8], "max_tokens": 4000},
                                       times[i], stop)) for i in range(running)]
    while min(len(t) for t in times) < 3:  # the streams are decoding
        await asyncio.sleep(0.05)
    sent = time.perf_counter()
    prompt = "word" + " word" * (long_tokens - 1)  # one token per word for the embedded model's tokenizer
    long = await stream(client, {"model": model, "prompt": prompt, "max_tokens": 2})
    read = sent + (long.get("ttft") or 0)
    stop.set()
    await asyncio.gather(*runs)
    gaps = [_max_gap(t, sent, read) for t in times]
    during = [sum(1 for x in t if sent < x <= read) for t in times]
    each = []  # every gap of the running streams while the prompt was read
    for t in times:
        pts = [sent] + [x for x in t if sent < x <= read]
        each += [b - a for a, b in zip(pts, pts[1:])]
    each.sort()
    return {"running_streams": running, "long_prompt_tokens": long_tokens, "long_ttft_s": round(long.get("ttft") or -1, 2),
            "error": long.get("error"), "max_gap_s": round(max(gaps), 3), "tokens_during_prefill": during,
            "median_gap_s": round(statistics.median(each), 3) if each else None,
            "p90_gap_s": round(each[int(0.9 * (len(each) - 1))], 3) if each else None, "met": max(gaps) <= 2.0}


async def cancels(client, model: str, streams: int, health) -> dict:
    times: list[list[float]] = [[] for _ in range(streams)]
    stops = [asyncio.Event() for _ in range(streams)]
    long = "word" + " word" * 1899  # puts the cache at 2048 slots per row
    runs = [asyncio.create_task(stream(client, {"model": model, "max_tokens": 4000,
                                                "prompt": long if i == 0 else PROMPTS[i % 8]}, times[i], stops[i]))
            for i in range(streams)]
    while min(len(t) for t in times) < 4:
        await asyncio.sleep(0.05)
    before = (await health())["scheduler"].get("cancel_seconds", 0.0)  # absent before the counter existed
    await asyncio.sleep(2)
    t_cut = time.perf_counter()
    for ev in stops[1::2]:
        ev.set()
    await asyncio.sleep(max(3.0, 4 * statistics.median(b - a for a, b in zip(times[0], times[0][1:]))))
    stats = (await health())["scheduler"]
    for ev in stops:
        ev.set()
    await asyncio.gather(*runs)
    keep = times[0::2]
    steady = statistics.median(b - a for t in keep for a, b in zip(t, t[1:]) if b <= t_cut)
    after = max(_max_gap(t, t_cut, t_cut + 2 * steady + 1) for t in keep)
    spent = stats["cancel_seconds"] - before if "cancel_seconds" in stats else None
    return {"streams": streams, "cancelled": len(stops[1::2]), "kv_capacity_tokens": 2048,
            "cancel_engine_seconds": round(spent, 4) if spent is not None else None,
            "survivor_median_gap_s": round(steady, 3), "survivor_max_gap_after_cancel_s": round(after, 3),
            "met": spent is not None and spent < 0.1}


async def queue(client, model: str, streams: int, tokens: int, health) -> dict:
    t0 = time.perf_counter()
    res = await asyncio.gather(*[stream(client, {"model": model, "prompt": PROMPTS[i % 8], "max_tokens": tokens})
                                 for i in range(streams)])
    stats = (await health())["scheduler"]
    fails = [r for r in res if "error" in r or r["tokens"] != tokens]
    return {"streams": streams, "failures": len(fails), "seconds": round(time.perf_counter() - t0, 1),
            "max_batch_rows": stats["max_batch_rows"], "max_rows": stats["max_rows"], "met": not fails}


def chunks(args) -> dict:
    """Prefill seconds per chunk at a few offsets into a long prompt (no server)."""
    import torch

    from entropix.loading import load_model

    lm = load_model(args.model, backend=args.backend, device=args.device, dtype="auto", progress=False)
    model = lm.model
    out = {}
    offsets = (0, 3584, 7168)  # where a 7,500-token prompt's chunks fall
    for size in (64, 128, 256, 512):
        cache = model.new_cache(1, offsets[-1] + size + 1)
        rows = []
        with torch.inference_mode():
            for off in offsets:
                best = float("inf")
                for _ in range(args.repeats):  # the least of a few: the machine may be shared
                    cache.lengths, cache._dev = [off], None  # attend to `off` cached slots (not timed)
                    toks = torch.randint(100, 1000, (1, size))
                    t0 = time.perf_counter()
                    model(toks, cache, ())
                    best = min(best, time.perf_counter() - t0)
                rows.append(best)
        out[str(size)] = {"seconds_at_offsets": dict(zip(map(str, offsets), (round(x, 3) for x in rows))),
                          "tokens_per_s": round(size * len(rows) / sum(rows), 1)}
    return {"chunk_sizes": out}


async def serve_scenarios(url: str, args, which: set[str]) -> dict:
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=None)) as client:
        async def health():
            return (await client.get("/health")).json()

        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await stream(client, {"model": model, "prompt": "Warm-up:", "max_tokens": 4})
        if "throughput" in which:
            out["throughput"] = await throughput(client, model, args.streams, args.tokens)
        if "long" in which:
            out["long"] = await long_prompt(client, model, args.running, args.long_tokens)
        if "cancel" in which:
            out["cancel"] = await cancels(client, model, args.streams, health)
        if "queue" in which:
            out["queue"] = await queue(client, model, 2 * args.streams, args.tokens, health)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=["all", "throughput", "long", "cancel", "queue", "chunks"])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=7500)
    ap.add_argument("--running", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="chunks: timings per size and offset (the least counts)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    which = set(args.scenario or ["all"])
    if "all" in which:
        which = {"throughput", "long", "cancel", "queue", "chunks"}
    result: dict = {"load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    if "chunks" in which:
        result["chunks"] = chunks(args)
    if which - {"chunks"}:
        extra = ["--max-rows", str(args.streams)]
        if args.prefill_chunk:
            extra += ["--prefill-chunk", str(args.prefill_chunk)]
        port = free_port()
        proc = start_server(port, args, extra)
        try:
            result.update(asyncio.run(serve_scenarios(f"http://127.0.0.1:{port}", args, which)))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

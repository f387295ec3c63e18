"""Per-op time of one decode step, eager and then compiled (`--compile`), on the embedded model.

Prefills a 64-token prompt, decodes greedily through the model's forward (no sampler), and prints
the milliseconds per step of each and torch.profiler's table of self time per op over 10 steps.

    python benchmarks/profile_step.py [--quant int4] [--threads 2] [--rows 1] [--top 15]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from entropix.backends.torch.compiled import compile_decode
from entropix.loading import load_model


def steps(model, cache, tok: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        logits, _ = model(tok, cache)
        tok = logits.argmax(-1, keepdim=True)
    return tok


@torch.inference_mode()
def measure(model, rows: int, top: int, label: str) -> float:
    cache = model.new_cache(rows, 512)
    prompt = torch.randint(100, 1000, (rows, 64), generator=torch.Generator().manual_seed(0))
    logits, _ = model(prompt, cache)
    tok = steps(model, cache, logits.argmax(-1, keepdim=True), 8)  # warm-up (compiles, when compiled)
    t = time.perf_counter()
    tok = steps(model, cache, tok, 50)
    ms = (time.perf_counter() - t) / 50 * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(model, cache, tok, 10)
    print(f"## {label}: {ms:.2f} ms per step ({rows} row{'s' if rows > 1 else ''}, {torch.get_num_threads()} threads)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(None, quant=a.quant, progress=False)
    eager = measure(lm.model, a.rows, a.top, f"eager, --quant {a.quant}")
    if not compile_decode(lm.model):
        return
    compiled = measure(lm.model, a.rows, a.top, f"compiled, --quant {a.quant}")
    print(f"compiled / eager step time: {compiled / eager:.3f}")


if __name__ == "__main__":
    main()

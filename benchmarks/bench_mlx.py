"""Does mx.compile pay for the MLX sampler maths? Compiled against eager, in one run.

    python benchmarks/bench_mlx.py [--rows 1 4 10] [--vocab 49152] [--repeats 200]

Prints one JSON line per batch size: microseconds per call eager and compiled, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx

from entropix.backends.mlx import ops


def per_call(fn, x, repeats: int) -> float:
    for _ in range(10):  # warm-up (and the compile)
        mx.eval(*fn(x))
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(*fn(x))
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 10])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    for B in a.rows:
        x = mx.random.normal((B, a.vocab)) * 4
        eager = per_call(lambda v: ops.logit_metrics(v, compiled=False), x, a.repeats)
        comp = per_call(lambda v: ops.logit_metrics(v, compiled=True), x, a.repeats)
        print(json.dumps({"rows": B, "vocab": a.vocab, "device": str(mx.default_device()),
                          "eager_us": round(eager, 1), "compiled_us": round(comp, 1),
                          "compiled_speedup": round(eager / comp, 2)}))


if __name__ == "__main__":
    main()

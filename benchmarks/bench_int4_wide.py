"""Where backends/torch/int4_wide.py takes over from the int4 kernel (CPU).

For each projection shape of the embedded model and a range of rows M, times one product
with: the int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations), the dense path over
the same packed weights (dequantized block by block, fp32 GEMM), and fp32 with a dense weight
(what `--quant none` pays, for scale). Ratios in one run; prints one JSON object.

    python benchmarks/bench_int4_wide.py [--rows 32 64 128 256 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from entropix.backends.torch import int4_wide
from entropix.backends.torch.quant import Int4Linear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def one_shape(N: int, K: int, rows: list[int]) -> dict:
    w = torch.randn(N, K)
    lin = Int4Linear.from_float(w)
    out = {}
    for M in rows:
        x = torch.randn(M, K)
        xb = x.bfloat16()
        kernel = timed(lambda: torch._weight_int4pack_mm_for_cpu(xb, lin.packed, lin.group, lin.scales_zeros))
        wide = timed(lambda: int4_wide.wide_mm(x, lin.packed, lin.scales_zeros, lin.group))
        dense = timed(lambda: x @ w.t())
        out[M] = {"kernel_ms": round(kernel, 3), "wide_ms": round(wide, 3), "fp32_ms": round(dense, 3),
                  "wide_speedup": round(kernel / wide, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "wide_rows": int4_wide.WIDE_ROWS,
           "shapes": {name: one_shape(N, K, args.rows) for name, (N, K) in SHAPES.items()}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Why backends/torch/model.py multiplies decode batches the way it does (CPU, fp32).

For each projection shape of the embedded model, times one product of M rows over all 30
layers' weights (so they stream from memory, as in a decode step) with: F.linear (MKL),
F.linear over 512-column slices (the `Linear` path for 4-12 rows), and oneDNN with the
weight packed once (the `PackedLinear` output projection). Prints one JSON object.

    python benchmarks/bench_linear.py [--rows 1 4 10 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"gate_up": (576, 3072, 30), "down": (1536, 576, 30), "qkv": (576, 960, 30), "lm_head": (576, 49152, 1)}


def timed(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return round((time.perf_counter() - t) / reps * 1e3, 2)


def chunked(x: torch.Tensor, w: torch.Tensor, cols: int = 512) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0])
    for i in range(0, w.shape[0], cols):
        torch.mm(x, w[i:i + cols].t(), out=out[:, i:i + cols])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 10, 16])
    args = ap.parse_args()
    torch.manual_seed(0)
    out: dict = {"threads": torch.get_num_threads()}
    for name, (k, n, layers) in SHAPES.items():
        ws = [torch.randn(n, k) for _ in range(layers)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
        for m in args.rows:
            x = torch.randn(m, k)
            out[f"{name}_m{m}_ms"] = {
                "mkl": timed(lambda: [F.linear(x, w) for w in ws]),
                "mkl_512_columns": timed(lambda: [chunked(x, w) for w in ws]),
                "onednn_packed": timed(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                                for p in packed]),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    with torch.inference_mode():
        main()

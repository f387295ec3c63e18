"""CUDA checks on a machine with a GPU: parity with the CPU, batching, speed against transformers.

    python benchmarks/cuda_check.py [--model M]     # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1

    from entropix.bench.speed import run_bench
    from entropix.decode.engine import generate
    from entropix.decode.records import Request
    from entropix.loading import load_model
    from entropix.sampler import catalog
    from entropix.sampler.policy import Greedy

    out: dict = {"device": torch.cuda.get_device_name()}
    cpu = load_model(args.model, device="cpu", dtype="float32", progress=False)
    gpu = load_model(args.model, device="cuda", dtype="float32", progress=False)
    bf = load_model(args.model, device="cuda", dtype="bfloat16", progress=False)
    tok = cpu.tokenizer
    ids = tok.encode("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                     "combined movable metal type, oil-based inks and a wooden press, so that books")

    def logits(lm):
        cache = lm.model.new_cache(1, len(ids))
        with torch.inference_mode():
            return lm.model(torch.tensor([ids], device=lm.model.device), cache, last_only=False)[0].float().cpu()

    ref = logits(cpu)
    out["fp32_cuda_vs_cpu_max_abs"] = (logits(gpu) - ref).abs().max().item()
    out["bf16_cuda_vs_cpu_max_abs"] = (logits(bf) - ref).abs().max().item()

    def greedy(lm, prompts, n=48):
        reqs = [Request(prompt=p, policy=Greedy(), max_tokens=n) for p in prompts]
        got = {r.id: [] for r in reqs}
        for rec in generate(lm.engine(), reqs):
            got[rec.request_id].append(rec.token)
        return [got[r.id] for r in reqs]

    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in
               ["Hi!", "Name three colours.", "Why is the sky blue? Answer in one sentence.", "2+2="]]
    on_gpu = greedy(gpu, prompts)
    out["greedy_cuda_equals_cpu"] = on_gpu == greedy(cpu, prompts)
    out["batch4_equals_alone_cuda"] = on_gpu == [greedy(gpu, [p])[0] for p in prompts]
    ent = catalog.resolve("entropix", gpu).policy
    r1 = [r.token for r in generate(gpu.engine(), [Request(prompt=prompts[1], policy=ent, max_tokens=32, seed=11)])]
    r2 = [r.token for r in generate(gpu.engine(), [Request(prompt=prompts[1], policy=ent, max_tokens=32, seed=11)])]
    r3 = [r.token for r in generate(cpu.engine(), [Request(prompt=prompts[1], policy=ent, max_tokens=32, seed=11)])]
    out["entropix_same_seed_same_tokens_cuda"] = r1 == r2
    out["entropix_cuda_equals_cpu"] = r1 == r3  # the draws come from the host: the same on every device
    del cpu
    t = time.perf_counter()
    out["bench_fp32"] = run_bench(gpu, tokens=args.tokens, repeats=3, samplers=["entropix", "cot"])
    out["bench_bf16"] = run_bench(bf, tokens=args.tokens, repeats=3)
    out["bench_seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

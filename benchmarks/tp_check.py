"""Tensor-parallel check for a machine with several CUDA GPUs: TP=1 vs TP=N parity and decode speed.

    python benchmarks/tp_check.py --tp 8 [--model M] [--dtype bf16] [--tokens 64]   # one JSON object
    python benchmarks/tp_check.py --tp 2 --device cpu --dtype float32               # the same on the CPU (gloo)

This process is rank 0; the other ranks are spawned (entropix.backends.torch.ranks). TP=1 runs only where
the model fits one device (--skip-single otherwise: then only TP=N's speed is reported).
Figures: max |logit difference| after the prompt, greedy tokens equal (and where they first
differ), entropix sampler regimes equal with the same seeds, decode tokens/s at 1 and 8 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def greedy(lm, prompts, n):
    from entropix.decode.engine import generate
    from entropix.decode.records import Request
    from entropix.sampler.policy import Greedy

    reqs = [Request(prompt=p, policy=Greedy(), max_tokens=n, stop_ids=frozenset()) for p in prompts]
    got = {r.id: [] for r in reqs}
    for rec in generate(lm.engine(), reqs):
        got[rec.request_id].append(rec.token)
    return [got[r.id] for r in reqs]


def regimes(lm, prompt, n):
    """(token, entropix regime) per step with a fixed seed: the host's draws, so both runs see the same."""
    from entropix.decode.engine import generate
    from entropix.decode.records import Request
    from entropix.sampler import catalog

    dec = catalog.build("entropix", catalog.parameters("entropix"), lm)
    req = Request(prompt=prompt, policy=dec.policy, max_tokens=n, seed=7, stop_ids=frozenset())
    return [(r.token, r.regime) for r in generate(lm.engine(dec.capture_layers), [req])]


def decode_speed(lm, prompt, rows, n):
    greedy(lm, [prompt] * rows, 4)  # warm up (kernels, allocator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    greedy(lm, [prompt] * rows, n)
    return rows * n / (time.perf_counter() - t)


def prompt_logits(lm, ids):
    b = lm.engine().backend
    b.prefill([ids], [1], capture=True)
    return getattr(b, "local", b).logits.float().cpu()


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def compare(single, sharded, prompts, tokens, out):
    out["prompt_logits_max_abs"] = (prompt_logits(single, prompts[0]) - prompt_logits(sharded, prompts[0])).abs().max().item()
    a, b = greedy(single, prompts, tokens), greedy(sharded, prompts, tokens)
    out["greedy_equal"] = a == b
    out["greedy_first_difference"] = [first_difference(x, y) for x, y in zip(a, b)]
    sa, sb = regimes(single, prompts[0], tokens), regimes(sharded, prompts[0], tokens)
    out["entropix_regimes_equal"] = sa == sb
    out["entropix_first_difference"] = first_difference(sa, sb)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tp", type=int, default=torch.cuda.device_count() or 2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-single", action="store_true", help="the model does not fit one device")
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        print(json.dumps({"error": f"--tp {args.tp} needs {args.tp} CUDA GPUs, {torch.cuda.device_count()} visible"}))
        return 1

    from entropix.loading import load_tensor_parallel as start
    from entropix.loading import load_model

    out: dict = {"tp": args.tp, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                 "dtype": args.dtype}
    t = time.perf_counter()
    sharded = start(args.model, args.tp, device=args.device, dtype=args.dtype, exit_on_lost=False)
    out["tp_load_s"] = round(time.perf_counter() - t, 1)
    tok = sharded.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in
               ["Why is the sky blue? Answer in two sentences.", "Name three colours.", "2+2=", "Hi!"]]
    try:
        out[f"tp{args.tp}_decode_tok_s_1row"] = round(decode_speed(sharded, prompts[0], 1, args.tokens), 2)
        out[f"tp{args.tp}_decode_tok_s_8rows"] = round(decode_speed(sharded, prompts[0], 8, args.tokens), 2)
        if not args.skip_single:
            dev = "cuda:0" if args.device == "cuda" else args.device
            single = load_model(args.model, device=dev, dtype=args.dtype, progress=False)
            compare(single, sharded, prompts, args.tokens, out)
            out["tp1_decode_tok_s_1row"] = round(decode_speed(single, prompts[0], 1, args.tokens), 2)
            out["tp1_decode_tok_s_8rows"] = round(decode_speed(single, prompts[0], 8, args.tokens), 2)
            for rows in ("1row", "8rows"):
                out[f"speedup_{rows}"] = round(out[f"tp{args.tp}_decode_tok_s_{rows}"] / out[f"tp1_decode_tok_s_{rows}"], 3)
    finally:
        sharded.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

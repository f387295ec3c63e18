"""Decode speed through llama.cpp: its own greedy loop against ours (greedy and entropix).

    .venv/bin/python benchmarks/bench_llamacpp.py [--model FILE.gguf] [--tokens 64] [--repeats 3]

One llama_cpp.Llama serves every mode; the modes alternate per repeat (so a busy machine
slows them alike) and each reports its best decode tokens/s over the repeats: from the
first generated token to the last, so the prompt's evaluation (the same in every mode,
and on a shared machine the noisiest part) is not in it.
Modes: llama.cpp's own greedy (`Llama.generate`, temp 0), our engine driving llama.cpp
token by token (`entropix generate --engine llama.cpp`) with greedy and with logits-only
entropix, and the EntropixLogitsProcessor inside `Llama.generate`.
"""

from __future__ import annotations

import argparse
import json
import time

from entropix.adapters import llamacpp
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.sampler.config import load_profile
from entropix.sampler.policy import Entropix, Greedy

PROMPT = "Write a long story about a robot who learns to paint."


def decode_rate(stream, n: int) -> float:
    """Tokens per second after the first of n tokens."""
    count, t0 = 0, 0.0
    for _ in stream:
        count += 1
        if count == 1:
            t0 = time.perf_counter()
        if count == n:
            break
    return (count - 1) / (time.perf_counter() - t0)


def own_greedy(m, ids, n, processor=None):
    from llama_cpp import LogitsProcessorList

    m.llm.reset()
    kw = {"logits_processor": LogitsProcessorList([processor])} if processor else {}
    return decode_rate(m.llm.generate(ids, temp=0.0, **kw), n)


def ours(m, ids, n, policy, seed=1):
    req = Request(prompt=ids, policy=policy, max_tokens=n, seed=seed, stop_ids=frozenset())
    return decode_rate(generate(m.engine(), [req]), n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    m = llamacpp.load(args.model, n_ctx=1024)
    ids = m.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    cfg = load_profile(m.name)
    pid = m.tokenizer.find_token(cfg.pause_text)
    ent = Entropix(cfg, pid, attention=False)
    modes = {
        "llama.cpp greedy": lambda: own_greedy(m, ids, args.tokens),
        "ours greedy": lambda: ours(m, ids, args.tokens, Greedy()),
        "ours entropix": lambda: ours(m, ids, args.tokens, ent),
        "processor entropix": lambda: own_greedy(m, ids, args.tokens,
                                                 llamacpp.EntropixLogitsProcessor(cfg, seed=1, pause_id=pid)),
    }
    best = {k: 0.0 for k in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            best[name] = max(best[name], fn())
    base = best["llama.cpp greedy"]
    print(json.dumps({"model": m.name, "tokens": args.tokens, "prompt_tokens": len(ids), "repeats": args.repeats,
                      "tokens_per_s": {k: round(v, 2) for k, v in best.items()},
                      "ratio_to_llamacpp_greedy": {k: round(v / base, 3) for k, v in best.items()}}, indent=1))


if __name__ == "__main__":
    main()

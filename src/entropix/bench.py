"""Benchmarks: our decode speed against transformers, and samplers against greedy.

Every figure is a ratio taken in one run on one machine: absolute tokens/s drift.
Runs alternate between the contenders and the median of `repeats` is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .decode.records import Request
from .decode.strategies import Task, decode, run
from .loading import LoadedModel
from .sampler import catalog
from .sampler.catalog import Decoder


def _prompt(lm: LoadedModel, n: int) -> list[int]:
    text = ("Entropy measures how uncertain a language model is about its next token. " * 64)
    ids = lm.tokenizer.encode(text)
    return ids[:n]


def time_ours(lm: LoadedModel, prompt: list[int], tokens: int, dec: Decoder, seed: int = 0) -> dict[str, float]:
    """Prefill and decode times of one request in our engine (stop tokens ignored)."""
    eng = lm.engine(dec.capture_layers)
    req = Request(prompt=prompt, policy=dec.policy, max_tokens=tokens, seed=seed, stop_ids=frozenset(), top_logprobs=1)
    _sync(lm, eng)
    t0 = time.perf_counter()
    eng.add([req])
    _sync(lm, eng)
    t1 = time.perf_counter()
    n = 0
    while eng.active:
        n += len(eng.step())
    _sync(lm, eng)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": n}


def time_runner(lm: LoadedModel, prompt: list[int], tokens: int, dec: Decoder, seed: int = 0) -> float:
    """Wall time of a multi-row decoder (CoT, self-consistency) for the same job (no stops, no follow-ups)."""
    task = Task(prompts=[prompt], max_tokens=[tokens], seeds=[seed], follow_up=False)
    _sync(lm)
    t0 = time.perf_counter()
    run(lm.engine(dec.capture_layers), decode(dec, task, lm.tokenizer, lm.config.max_position_embeddings))
    _sync(lm)
    return time.perf_counter() - t0


def time_transformers(hf, prompt: list[int], tokens: int, device) -> dict[str, float]:
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(ids)  # prefill alone
        _sync_dev(device)
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                    pad_token_id=0, attention_mask=torch.ones_like(ids))
        _sync_dev(device)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return {"prefill_s": prefill, "decode_s": max(t2 - t1 - prefill, 1e-9), "tokens": tokens}


def load_transformers(lm: LoadedModel):
    """The same model and dtype in transformers, or None when it is not installed."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from pathlib import Path

    import contextlib
    import io

    src = Path(lm.source)
    kw: dict[str, Any] = {"dtype": lm.model.dtype}
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF converter's own progress bars
        if src.suffix == ".gguf":
            hf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, **kw)
        else:
            hf = AutoModelForCausalLM.from_pretrained(src, **kw)
    return hf.to(lm.model.device).eval()


def run_bench(lm: LoadedModel, tokens: int = 128, prompt_tokens: int = 64, repeats: int = 3,
              samplers: list[str] = (), branches: int | None = None, baseline: bool = True) -> dict[str, Any]:
    prompt = _prompt(lm, prompt_tokens)
    greedy = catalog.resolve("greedy", lm)
    extra = {name: catalog.resolve(name, lm, branches=branches) for name in samplers}
    hf = load_transformers(lm) if baseline else None
    # warm-up: first calls allocate and pick kernels
    time_ours(lm, prompt, 8, greedy)
    if hf is not None:
        time_transformers(hf, prompt, 8, lm.model.device)
    runs: dict[str, list[Any]] = {"ours": [], "hf": [], **{n: [] for n in extra}}
    for _ in range(repeats):
        runs["ours"].append(time_ours(lm, prompt, tokens, greedy))
        if hf is not None:
            runs["hf"].append(time_transformers(hf, prompt, tokens, lm.model.device))
        for name, s in extra.items():
            if s.strategy != "single":
                runs[name].append(time_runner(lm, prompt, tokens, s))
            else:
                runs[name].append(time_ours(lm, prompt, tokens, s, seed=1))

    def tps(rs):
        return statistics.median((r["tokens"] - 1) / r["decode_s"] for r in rs)

    def prefill_tps(rs):
        return statistics.median(len(prompt) / r["prefill_s"] for r in rs)

    out: dict[str, Any] = {
        "model": lm.name, "device": str(lm.model.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "prompt_tokens": len(prompt), "new_tokens": tokens, "repeats": repeats,
        "ours_tps": round(tps(runs["ours"]), 2), "ours_prefill_tps": round(prefill_tps(runs["ours"]), 1),
    }
    if hf is not None:
        out["transformers_tps"] = round(tps(runs["hf"]), 2)
        out["transformers_prefill_tps"] = round(prefill_tps(runs["hf"]), 1)
        out["ratio"] = round(out["ours_tps"] / out["transformers_tps"], 3)
        out["prefill_ratio"] = round(out["ours_prefill_tps"] / out["transformers_prefill_tps"], 3)
    greedy_wall = statistics.median(r["prefill_s"] + r["decode_s"] for r in runs["ours"])
    for name, rs in ((n, runs[n]) for n in extra):
        if isinstance(rs[0], dict):
            out[f"{name}_tps"] = round(tps(rs), 2)
            out[f"{name}_vs_greedy"] = round(out[f"{name}_tps"] / out["ours_tps"], 3)
        else:
            out[f"{name}_time_vs_greedy"] = round(statistics.median(rs) / greedy_wall, 3)
            out[f"{name}_seconds"] = round(statistics.median(rs), 3)
    return out


def run_backend_bench(lm: LoadedModel, reference: LoadedModel, tokens: int = 128, prompt_tokens: int = 64,
                      repeats: int = 3) -> dict[str, Any]:
    """Greedy decode tokens/s of a backend (lm) and of the PyTorch backend (reference) on the
    same model, alternating runs, and their ratio."""
    prompt = _prompt(lm, prompt_tokens)
    greedy = catalog.resolve("greedy", lm)
    counter = _compile_counter(lm)
    c0 = counter()
    time_ours(lm, prompt, tokens, greedy)  # warm-up: compilations (jax), kernel choices (torch)
    first_run = counter() - c0
    time_ours(reference, prompt, tokens, greedy)
    c1 = counter()
    runs: dict[str, list[dict[str, float]]] = {lm.backend: [], "torch": []}
    for _ in range(repeats):
        runs[lm.backend].append(time_ours(lm, prompt, tokens, greedy))
        runs["torch"].append(time_ours(reference, prompt, tokens, greedy))
    tps = {k: statistics.median((r["tokens"] - 1) / r["decode_s"] for r in rs) for k, rs in runs.items()}
    pre = {k: statistics.median(len(prompt) / r["prefill_s"] for r in rs) for k, rs in runs.items()}
    b = lm.backend
    return {"model": lm.name, "backend": b, "device": lm.device, "dtype": lm.dtype, "threads": torch.get_num_threads(),
            "prompt_tokens": len(prompt), "new_tokens": tokens, "repeats": repeats,
            f"{b}_tps": round(tps[b], 2), "torch_tps": round(tps["torch"], 2),
            f"{b}_vs_torch": round(tps[b] / tps["torch"], 3),
            f"{b}_prefill_tps": round(pre[b], 1), "torch_prefill_tps": round(pre["torch"], 1),
            "compilations_first_run": first_run, "compilations_timed_runs": counter() - c1}


def _compile_counter(lm: LoadedModel):
    """A function returning the backend's compilations so far (0 for eager backends)."""
    if lm.backend == "jax":
        from .backends.jax.compiled import compilations

        return compilations
    return lambda: 0


def _sync(lm: LoadedModel, eng=None) -> None:
    if lm.backend != "torch":  # the backend waits for its own queued work
        sync = getattr(eng.backend, "synchronize", None) if eng is not None else None
        if sync is not None:
            sync()
        return
    _sync_dev(lm.model.device)


def _sync_dev(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

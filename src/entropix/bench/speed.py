"""Benchmarks: our decode speed against transformers, and samplers against greedy.

Every figure is a ratio taken in one run on one machine: absolute tokens/s drift.
Runs alternate between the contenders and the median of `repeats` is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..decode.records import Request
from ..decode.strategies import Task, decode, run
from ..loading import LoadedModel
from ..sampler import catalog
from ..sampler.catalog import Decoder


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
    if lm.backend != "torch":
        return run_backend_bench(lm, tokens, prompt_tokens, repeats, samplers, branches)
    prompt = _prompt(lm, prompt_tokens)
    greedy = catalog.resolve("greedy", lm)
    extra = {name: catalog.resolve(name, lm, branches=branches) for name in samplers}
    hf = load_transformers(lm) if baseline else None
    # warm-up: first calls allocate, pick kernels and (--compile) compile each decoder's batch size
    time_ours(lm, prompt, 8, greedy)
    for s in extra.values():
        time_runner(lm, prompt, 8, s) if s.strategy != "single" else time_ours(lm, prompt, 8, s, seed=1)
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
        "model": lm.name, **timed_mode(lm), "prompt_tokens": len(prompt), "new_tokens": tokens, "repeats": repeats,
        "ours_tps": round(tps(runs["ours"]), 2), "ours_prefill_tps": round(prefill_tps(runs["ours"]), 1),
    }
    if hf is not None:
        out["transformers_mode"] = {"quant": "none", "dtype": str(hf.dtype).removeprefix("torch."),
                                    "threads": out["threads"]}
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


def timed_mode(lm: LoadedModel) -> dict[str, Any]:
    """What our figures were timed under: device, dtype, weight mode (with how many projections
    each kind holds) and torch's threads."""
    from ..backends.torch.quant import weight_kinds

    return {"device": str(lm.model.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
            "quant": lm.quant, "weights": weight_kinds(lm.model), "threads": torch.get_num_threads()}


def run_backend_bench(lm: LoadedModel, tokens: int = 128, prompt_tokens: int = 64, repeats: int = 3,
                      samplers: list[str] = (), branches: int | None = None) -> dict[str, Any]:
    """Another backend (jax, mlx) beside the PyTorch backend on the same weights and dtype, in one run:
    greedy decode and prefill tokens/s of each, alternating, and each sampler on both."""
    from .. import EntropixError
    from ..loading import load_model

    try:
        twin = load_model(lm.source, backend="torch", device="cpu" if lm.device.startswith("cpu") else "auto", dtype=lm.dtype,
                          progress=False)
    except EntropixError as e:  # e.g. a quantized MLX folder: nothing to compare with
        raise EntropixError(f"bench --backend {lm.backend} compares with the torch backend, which cannot load "
                            f"this model ({e})") from None
    twin.name = lm.name  # the same profiles
    prompt = _prompt(lm, prompt_tokens)
    names = ["greedy", *samplers]
    decs = {(m.backend, n): catalog.resolve(n, m, branches=branches) for m in (lm, twin) for n in names}
    counter = _compile_counter(lm)
    c0 = counter()
    for m in (lm, twin):  # warm-up: first calls allocate, trace (jax compiles) and pick kernels
        time_ours(m, prompt, tokens if m is lm else 8, decs[(m.backend, "greedy")])
    first_run = counter() - c0
    runs: dict[tuple[str, str], list[Any]] = {k: [] for k in decs}
    for _ in range(repeats):
        for (backend, name), dec in decs.items():
            m = lm if backend == lm.backend else twin
            runs[(backend, name)].append(time_runner(m, prompt, tokens, dec) if dec.strategy != "single"
                                         else time_ours(m, prompt, tokens, dec, seed=1))
    out: dict[str, Any] = {"model": lm.name, "backend": lm.backend, "device": lm.device, "dtype": lm.dtype,
                           "torch_device": twin.device, "threads": torch.get_num_threads(),
                           "prompt_tokens": len(prompt), "new_tokens": tokens, "repeats": repeats,
                           "compilations_first_run": first_run}
    for (backend, name), rs in runs.items():
        key = backend if name == "greedy" else f"{backend}_{name}"
        if isinstance(rs[0], dict):
            out[f"{key}_tps"] = round(statistics.median((r["tokens"] - 1) / r["decode_s"] for r in rs), 2)
            if name == "greedy":
                out[f"{key}_prefill_tps"] = round(statistics.median(len(prompt) / r["prefill_s"] for r in rs), 1)
        else:
            out[f"{key}_seconds"] = round(statistics.median(rs), 3)
    for name in names:
        key = "" if name == "greedy" else f"_{name}"
        a, b = (f"{lm.backend}{key}_tps", f"torch{key}_tps") if f"torch{key}_tps" in out else \
            (f"{lm.backend}{key}_seconds", f"torch{key}_seconds")
        ratio = out[a] / out[b] if a.endswith("_tps") else out[b] / out[a]
        out[f"{lm.backend}_vs_torch{key}"] = round(ratio, 3)  # > 1: the other backend is faster
    out["compilations_timed_runs"] = counter() - c0 - first_run
    return out


def _compile_counter(lm: LoadedModel):
    """A function returning the backend's compilations so far (0 for eager backends)."""
    if lm.backend == "jax":
        from ..backends.jax.compiled import compilations

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

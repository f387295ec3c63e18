"""`entropix bench --modes ... --peer llama.cpp`: our weight modes against the peers, in one run.

Contenders: transformers (fp32, always when installed), llama.cpp through llama-cpp-python
(`--peer llama.cpp`; the same GGUF file, prompt ids, token count and threads), and our
engine in each mode (`--quant` values; a `+compile` suffix runs the compiled decode step).
The contenders alternate within each repeat, so a busy machine slows them alike; the
median decode tokens/s (after the first new token) is reported with ratios to each peer.

Parity against our fp32 model, per mode, on the same prompt:
- `logits_max_err`: max |logit - fp32 logit| over the fp32 greedy continuation, teacher-forced
  (both read the same context, so the figure does not compound over a divergence);
- `argmax_agree`: the fraction of those positions whose argmax equals fp32's;
- `greedy_same_prefix`: new tokens of the mode's own greedy decode equal to fp32's before the
  first difference (of `tokens`).
Peak RSS is measured per contender in a fresh subprocess (load + a short decode).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from .. import EntropixError
from .speed import _prompt, load_transformers, time_transformers, timed_mode
from ..decode.records import Request
from ..loading import LoadedModel, load_model
from ..sampler.policy import Greedy

PEERS = ("llama.cpp",)


# every weight mode, and the fastest of them compiled (each compile takes about a minute on 2 cores)
DEFAULT_MODES = "none,int8,int4,int4+compile"


def parse_modes(text: str | None) -> list[str]:
    """'none,int8,int4+compile' -> names, each checked (one-line error for a bad one)."""
    from ..backends.torch.quant import CHOICES

    names = [m.strip().lower() for m in (text or DEFAULT_MODES).split(",") if m.strip()]
    for m in names:
        base = m.removesuffix("+compile")
        if base not in CHOICES or base == "auto" and m != base:
            raise EntropixError(f"bench: unknown mode {m!r} (modes are {', '.join(CHOICES)}, each optionally +compile)")
    return names


def _load(source: str, mode: str) -> LoadedModel:
    lm = load_model(source, quant=mode.removesuffix("+compile"), progress=False)
    if mode.endswith("+compile"):
        from ..backends.torch.compiled import compile_decode

        compile_decode(lm.model)
    return lm


def greedy_tokens(lm: LoadedModel, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens of our engine (no stops) and the decode rate after the first of them."""
    eng = lm.engine(())
    eng.add([Request(prompt=prompt, policy=Greedy(), max_tokens=n, seed=0, stop_ids=frozenset())])
    out, t0 = [], 0.0
    while eng.active:
        out += [r.token for r in eng.step()]
        if len(out) == 1:
            t0 = time.perf_counter()
    return out, (len(out) - 1) / max(time.perf_counter() - t0, 1e-9)


@torch.inference_mode()
def forced_logits(lm: LoadedModel, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """fp32 logits [len(cont), V] predicting each continuation token, teacher-forced."""
    ids = torch.tensor([prompt + cont[:-1]], device=lm.model.device)
    cache = lm.model.new_cache(1, ids.shape[1] + 1)
    logits, _ = lm.model(ids, cache, last_only=False)
    return logits[0, len(prompt) - 1:].float().cpu()


def parity(lm: LoadedModel, prompt: list[int], ref_tokens: list[int], ref_logits: torch.Tensor) -> dict[str, Any]:
    own, _ = greedy_tokens(lm, prompt, len(ref_tokens))
    same = next((i for i, (a, b) in enumerate(zip(own, ref_tokens)) if a != b), len(ref_tokens))
    lg = forced_logits(lm, prompt, ref_tokens)
    return {"logits_max_err": round(float((lg - ref_logits).abs().max()), 4),
            "argmax_agree": round(float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean()), 4),
            "greedy_same_prefix": same}


def weight_mb(lm: LoadedModel) -> float:
    """Bytes of parameters, buffers and packed copies (the tied embedding once), in MB."""
    from ..backends.torch.layers import PackedLinear

    seen, total = set(), 0
    for t in [*lm.model.parameters(), *lm.model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in lm.model.modules():  # oneDNN's packed copy is no parameter: fp32, out x in
        if isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * 4
    return round(total / 1e6, 1)


class _LlamaCpp:
    """llama.cpp's own greedy loop over the same GGUF, prompt and threads."""

    def __init__(self, source: str, threads: int, n_ctx: int) -> None:
        if not source.endswith(".gguf"):
            raise EntropixError(f"--peer llama.cpp reads GGUF files; {source} is not one")
        from ..adapters.llamacpp import open_llama

        self.llm = open_llama(source, n_ctx=n_ctx, n_threads=threads)

    def time(self, prompt: list[int], n: int) -> float:
        self.llm.reset()
        count, t0 = 0, 0.0
        for _ in self.llm.generate(prompt, temp=0.0):
            count += 1
            if count == 1:
                t0 = time.perf_counter()
            if count == n:
                break
        return (count - 1) / max(time.perf_counter() - t0, 1e-9)


def _hf_rate(hf, prompt: list[int], n: int) -> float:
    r = time_transformers(hf, prompt, n, "cpu")
    return (r["tokens"] - 1) / r["decode_s"]


def run_modes_bench(lm: LoadedModel, modes: list[str], peers: list[str] = (), tokens: int = 128,
                    prompt_tokens: int = 64, repeats: int = 3, rss: bool = True) -> dict[str, Any]:
    if lm.backend != "torch" or not lm.device.startswith("cpu"):
        raise EntropixError("bench --modes/--peer compares CPU modes of the torch backend (--device cpu)")
    for p in peers:
        if p not in PEERS:
            raise EntropixError(f"bench: unknown peer {p!r} (known: {', '.join(PEERS)})")
    if "llama.cpp" in peers:
        from ..adapters.llamacpp import _llama_cpp

        if not lm.source.endswith(".gguf"):
            raise EntropixError(f"--peer llama.cpp reads GGUF files; {lm.source} is not one")
        _llama_cpp()  # installed, or a one-line error before anything is timed
    threads = torch.get_num_threads()
    prompt = _prompt(lm, prompt_tokens)
    ref = _load(lm.source, "none")
    ref_tokens, _ = greedy_tokens(ref, prompt, tokens)
    ref_logits = forced_logits(ref, prompt, ref_tokens)
    ours = {m: (ref if m == "none" else _load(lm.source, m)) for m in modes}
    rate: dict[str, Any] = {f"ours:{m}": (lambda lm_=ml: greedy_tokens(lm_, prompt, tokens)[1]) for m, ml in ours.items()}
    hf = load_transformers(ref)
    if hf is not None:
        rate["transformers"] = lambda: _hf_rate(hf, prompt, tokens)
    if "llama.cpp" in peers:
        llama = _LlamaCpp(lm.source, threads, n_ctx=prompt_tokens + tokens + 16)
        rate["llama.cpp"] = lambda: llama.time(prompt, tokens)
    for fn in rate.values():  # warm-up: first calls allocate, pick kernels, compile
        fn()
    runs: dict[str, list[float]] = {k: [] for k in rate}
    for _ in range(repeats):
        for k, fn in rate.items():
            runs[k].append(fn())
    tps = {k: statistics.median(v) for k, v in runs.items()}
    out: dict[str, Any] = {"model": lm.name, "source": os.path.basename(lm.source), "threads": threads,
                           "prompt_tokens": len(prompt), "new_tokens": tokens, "repeats": repeats,
                           "load_avg": [round(x, 2) for x in os.getloadavg()], "cpu": _cpu_name(),
                           "torch": torch.__version__}
    for k in ("transformers", "llama.cpp"):
        if k in tps:
            out[k] = {"tps": round(tps[k], 2), "peak_rss_mb": _rss(lm.source, k, threads) if rss else None}
    out["modes"] = {}
    for m, ml in ours.items():
        row = {"tps": round(tps[f"ours:{m}"], 2), "weights_mb": weight_mb(ml),
               **{k: v for k, v in timed_mode(ml).items() if k in ("quant", "weights", "dtype")}}
        for k in ("transformers", "llama.cpp"):
            if k in tps:
                row[f"vs_{k}"] = round(tps[f"ours:{m}"] / tps[k], 3)
        row.update(parity(ml, prompt, ref_tokens, ref_logits) if m != "none" else
                   {"logits_max_err": 0.0, "argmax_agree": 1.0, "greedy_same_prefix": tokens})
        if m.endswith("+compile"):  # the compiled step against the same weights decoded eager
            base = m.removesuffix("+compile")
            eager = greedy_tokens(ours.get(base) or _load(lm.source, base), prompt, tokens)[0]
            own = greedy_tokens(ml, prompt, tokens)[0]
            row["greedy_same_as_eager"] = next((i for i, (a, b) in enumerate(zip(own, eager)) if a != b), tokens)
        row["peak_rss_mb"] = _rss(lm.source, m, threads) if rss else None
        out["modes"][m] = row
    out["best"] = max(out["modes"], key=lambda m: out["modes"][m]["tps"])
    out["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def _rss(source: str, who: str, threads: int) -> float | None:
    """Peak RSS (MB) of a fresh process that loads `who` and decodes 16 tokens."""
    code = f"import sys; from entropix.bench.modes import _rss_child; _rss_child({source!r}, {who!r}, {threads})"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError):
        return None


def _rss_child(source: str, who: str, threads: int) -> None:
    from types import SimpleNamespace

    from ..io.source import open_checkpoint

    torch.set_num_threads(threads)
    ids = open_checkpoint(source).tokenizer.encode("Entropy measures how uncertain a language model is about its next token.")
    if who == "llama.cpp":
        _LlamaCpp(source, threads, 256).time(ids, 16)
    elif who == "transformers":  # only its own model in this process
        _hf_rate(load_transformers(SimpleNamespace(source=source, model=SimpleNamespace(dtype=torch.float32, device="cpu"))),
                 ids, 16)
    else:
        greedy_tokens(_load(source, who), ids, 16)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024, 1)

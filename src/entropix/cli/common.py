"""What the subcommands share: model and sampling options, loading, output helpers."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Iterable

from .. import EntropixError
from ..backends.peers import DEFAULT_TIMEOUT_S

REGIME_COLOURS = {  # ANSI colours per sampler regime, shared by every subcommand that streams
    "flowing": "\033[38;5;250m", "treading": "\033[38;5;214m", "branch": "\033[38;5;45m",
    "resample": "\033[38;5;197m", "adaptive": "\033[38;5;120m", "pause": "\033[38;5;226m",
}
RESET = "\033[0m"


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- shared options -------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file, Hugging Face folder, hub id, or 'default' (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="torch", help="the array framework that computes (default: torch)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA; on CPU the checkpoint's own, fp32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--quant", default="auto",
                   help="torch on CPU: weight-only int8 / int4 projections, none, or auto (the default: each "
                        "tensor as its checkpoint stores it, 4-bit blocks on the int4 kernel, Q8_0 on the int8 "
                        "one, everything else dense; dense on CUDA and MPS); see README 'Decode speed'")
    p.add_argument("--compile", action="store_true",
                   help="torch on one device: run the decode step as one compiled graph (inductor; the first "
                        "steps compile, about a minute on 2 CPU cores, then decoding is faster); see README 'Decode speed'")
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tp N (torch: N ranks here or torchrun's, see backends/torch/ranks.py; jax: the mesh) and --dp N (jax)."""
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks: torch starts N processes here (gloo on CPU, NCCL on CUDA), or "
                        "uses torchrun's; jax: the mesh's tp axis")
    p.add_argument("--dp", type=int, default=1, help="--backend jax: data-parallel devices (batch rows)")
    p.add_argument("--peer-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="how long a tensor-parallel rank or JAX process may stay silent before requests fail "
                        "with 503 and the others exit (default: %(default)s)")
    g = p.add_argument_group("--backend jax over several processes (one per host; none of these on a TPU pod "
                             "slice, where JAX finds its peers itself)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address, the same on every host")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's number, 0 to N-1")


def _given(args, name: str) -> int:
    v = getattr(args, name, None)
    return 1 if v is None else v


def load_torch_tp(args):
    """The model over tensor-parallel ranks when --tp > 1 (or under torchrun), else None."""
    from ..backends.torch.ranks import under_torchrun
    from ..loading import load_tensor_parallel

    tp = getattr(args, "tp", None)  # None: one device, or torchrun's world size
    if tp is not None and tp < 1:
        raise EntropixError(f"--tp must be at least 1, got {tp}")
    peer_timeout = getattr(args, "peer_timeout", None)
    if peer_timeout is not None and not 0 < peer_timeout < float("inf"):
        raise EntropixError(f"--peer-timeout must be a number of seconds above 0, got {peer_timeout}")
    if getattr(args, "backend", "torch") != "torch" or not ((tp or 1) > 1 or under_torchrun()):
        return None
    if getattr(args, "quant", "none") not in ("none", "auto"):  # auto means none there
        raise EntropixError(f"--quant {args.quant} runs on one device: tensor parallelism (--tp) takes --quant none")
    return load_tensor_parallel(args.model, tp, device=args.device, dtype=args.dtype, peer_timeout=peer_timeout)


def load_jax_job(args):
    """--backend jax over the processes of a job (--coordinator ..., or a TPU pod slice), else None."""
    from ..backends.jax.multihost import Cluster, on_tpu_pod
    from ..loading import load_jax_multihost

    cluster = Cluster(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None))
    if getattr(args, "backend", "torch") != "jax":
        if cluster.given:
            raise EntropixError("--coordinator, --num-processes and --process-id take --backend jax")
        return None
    if not cluster.given and not on_tpu_pod():
        return None
    return load_jax_multihost(args.model, _given(args, "tp"), _given(args, "dp"), device=args.device,
                              dtype=args.dtype, cluster=cluster, peer_timeout=getattr(args, "peer_timeout", None))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from ..sampler import catalog

    p.add_argument("--sampler", default=None,
                   help=f"{', '.join(catalog.names())} (default: greedy, or sample when --temperature > 0)")
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--sampler-config", default=None, help="JSON profile of entropix sampler settings")


def load(args, quiet: bool = False):
    from ..loading import load_model

    if getattr(args, "engine", "entropix") == "llama.cpp":  # llama.cpp computes (src/entropix/adapters)
        from ..adapters import llamacpp

        return llamacpp.load(args.model)
    if getattr(args, "engine", "entropix") == "openai":  # an OpenAI-compatible server computes
        return load_upstream(args)

    quiet = quiet or bool(getattr(args, "process_id", None))  # a job's processes 1..N-1 print nothing
    if not quiet:
        eprint(f"loading model {args.model or 'default (SmolLM2-135M-Instruct, embedded)'} ...")
    t = time.perf_counter()
    backend = getattr(args, "backend", "torch")
    if hasattr(args, "quant"):  # a bad --quant fails before anything loads
        from ..backends.torch.quant import check_mode

        args.quant = check_mode(args.quant)
        if backend != "torch" and args.quant not in ("none", "auto"):
            raise EntropixError(f"--quant {args.quant} takes --backend torch (the {backend} backend keeps its dtype)")
    lm = load_torch_tp(args) or load_jax_job(args) or load_model(args.model, backend=backend, device=args.device, dtype=args.dtype,
                                           progress=not quiet, tp=1 if backend == "torch" else _given(args, "tp"),
                                           dp=_given(args, "dp"),  # torch's --tp ranks: load_torch_tp
                                           **({"quant": args.quant} if backend == "torch" and hasattr(args, "quant") else {}))
    if getattr(args, "compile", False):
        compile_step(lm)
    if not quiet:
        eprint(f"loaded {lm.name} ({lm.config.num_hidden_layers} layers, {lm.backend} on {lm.device}, "
               f"{lm.dtype}{_quant_note(lm)}) in {time.perf_counter() - t:.1f}s")
    return lm


def compile_step(lm) -> None:
    """--compile: the torch model's decode step as one graph (a warning, and eager, where it cannot be)."""
    if lm.backend != "torch" or lm.session is not None:
        raise EntropixError("--compile takes --backend torch on one device (without --tp)")
    from ..backends.torch.compiled import compile_decode

    compile_decode(lm.model)


def _quant_note(lm) -> str:
    quant = getattr(lm, "quant", "none") or "none"
    return "" if quant == "none" else f", {quant} weights"


def load_upstream(args):
    """The model behind --base-url; the tokenizer of --model when given, else the upstream's own."""
    import os

    from ..adapters.upstream import connect

    if not args.base_url:
        raise EntropixError("--engine openai needs --base-url (an OpenAI-compatible server's .../v1)")
    tok = None
    if args.model is not None:
        from ..io.source import open_checkpoint

        tok = open_checkpoint(args.model).tokenizer
    key = os.environ.get("ENTROPIX_UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return connect(args.base_url, args.upstream_model, tok, key)


def sampler_name(args) -> str:
    """The catalogue name the sampling flags pick (a default from --temperature and the filters)."""
    from ..sampler import catalog

    filters = any(v is not None for v in (args.top_k, args.top_p, args.min_p))
    return catalog.variant(args.sampler or catalog.default_name(args.temperature, filters),
                           branching=getattr(args, "branching", False),
                           no_attention=getattr(args, "no_attention", False))


def decoder_from_args(args, lm=None):
    """The catalogue's Decoder for the sampling flags (checked before the model loads when lm is None)."""
    from ..sampler import catalog

    name = sampler_name(args)
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 sampler_config=args.sampler_config, branches=getattr(args, "branches", None),
                 aggregate=getattr(args, "aggregate", None), samples=getattr(args, "samples", None))
    params = catalog.parameters(name, **given)
    return None if lm is None else catalog.build(name, params, lm)


def prompt_ids(lm, text: str, raw: bool, system: str | None = None) -> list[int]:
    tok = lm.tokenizer
    if raw:
        return tok.encode(text)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.encode_chat(msgs)


def end_line(tokens: int, secs: float, finish: str | None) -> str:
    """The closing line of every generate run (on stderr: stdout is only the answer)."""
    return f"[{tokens} tokens in {secs:.2f}s, {tokens / max(secs, 1e-9):.1f} tokens/s, finish: {finish}]"


def paint(text: str, regime: str, colour: bool) -> str:
    c = REGIME_COLOURS.get(regime, "") if colour else ""
    return f"{c}{text}{RESET}" if c else text


def regime_summary(records: Iterable[Any], regimes: tuple[str, ...], colour: bool = False) -> str:
    """A legend of the entropix regimes and how often each chose a token (records: TokenRecords or
    their dicts, which carry "regime", or "state" in runs saved before the rename)."""
    from ..sampler.policy import LEGEND

    counts: dict[str, int] = {}
    for r in records:
        reg = r.get("regime", r.get("state")) if isinstance(r, dict) else getattr(r, "regime", None)
        counts[reg or "?"] = counts.get(reg or "?", 0) + 1
    total = sum(counts.values())
    legend = "legend: " + " | ".join(f"{paint(s, s, colour)} = {LEGEND[s]}" for s in regimes if s in LEGEND)
    order = [s for s in regimes if s in counts] + sorted(s for s in counts if s not in regimes)
    fired = ", ".join(f"{paint(s, s, colour)} {counts[s]} ({100 * counts[s] / total:.0f}%)" for s in order)
    return f"{legend}\nregimes: {fired or 'none'}"

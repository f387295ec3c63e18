"""The `entropix` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Iterable

from . import EntropixError, __version__

STATE_COLOURS = {  # ANSI colours per sampler state, shared by every subcommand that streams
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
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tp N (torch: N ranks here or torchrun's, see entropix.distributed; jax: the mesh) and --dp N (jax)."""
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks: torch starts N processes here (gloo on CPU, NCCL on CUDA), or "
                        "uses torchrun's; jax: the mesh's tp axis")
    p.add_argument("--dp", type=int, default=1, help="--backend jax: data-parallel devices (batch rows)")


def _given(args, name: str) -> int:
    v = getattr(args, name, None)
    return 1 if v is None else v


def load_torch_tp(args):
    """The model over tensor-parallel ranks when --tp > 1 (or under torchrun), else None."""
    from .distributed import start, under_torchrun

    tp = getattr(args, "tp", None)  # None: one device, or torchrun's world size
    if tp is not None and tp < 1:
        raise EntropixError(f"--tp must be at least 1, got {tp}")
    if getattr(args, "backend", "torch") != "torch" or not ((tp or 1) > 1 or under_torchrun()):
        return None
    if getattr(args, "quant", "none") not in ("none", "auto"):  # auto means none there
        raise EntropixError(f"--quant {args.quant} runs on one device: tensor parallelism (--tp) takes --quant none")
    return start(args.model, tp, device=args.device, dtype=args.dtype)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .sampler import catalog

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
    from .loading import load_model

    if getattr(args, "engine", "entropix") == "llama.cpp":  # llama.cpp computes (src/entropix/adapters)
        from .adapters import llamacpp

        return llamacpp.load(args.model)

    if not quiet:
        eprint(f"loading model {args.model or 'default (SmolLM2-135M-Instruct, embedded)'} ...")
    t = time.perf_counter()
    backend = getattr(args, "backend", "torch")
    if hasattr(args, "quant"):  # a bad --quant fails before anything loads
        from .backends.torch.quant import check_mode

        args.quant = check_mode(args.quant)
        if backend != "torch" and args.quant not in ("none", "auto"):
            raise EntropixError(f"--quant {args.quant} takes --backend torch (the {backend} backend keeps its dtype)")
    lm = load_torch_tp(args) or load_model(args.model, backend=backend, device=args.device, dtype=args.dtype,
                                           progress=not quiet, tp=1 if backend == "torch" else _given(args, "tp"),
                                           dp=_given(args, "dp"),  # torch's --tp ranks: load_torch_tp
                                           **({"quant": args.quant} if backend == "torch" and hasattr(args, "quant") else {}))
    if not quiet:
        eprint(f"loaded {lm.name} ({lm.config.num_hidden_layers} layers, {lm.backend} on {lm.device}, "
               f"{lm.dtype}{_quant_note(lm)}) in {time.perf_counter() - t:.1f}s")
    return lm


def _quant_note(lm) -> str:
    quant = getattr(lm, "quant", "none") or "none"
    return "" if quant == "none" else f", {quant} weights"


def decoder_from_args(args, lm=None):
    """The catalogue's Decoder for the sampling flags (checked before the model loads when lm is None)."""
    from .sampler import catalog

    filters = any(v is not None for v in (args.top_k, args.top_p, args.min_p))
    name = catalog.variant(args.sampler or catalog.default_name(args.temperature, filters),
                           branching=getattr(args, "branching", False),
                           no_attention=getattr(args, "no_attention", False))
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


# -- generate -------------------------------------------------------------------

def cmd_generate(args) -> int:
    if args.max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    decoder_from_args(args)  # bad sampler flags fail before the model loads
    lm = load(args, quiet=args.json)
    dec = decoder_from_args(args, lm)
    if args.engine == "llama.cpp":
        from .adapters.llamacpp import adapt_decoder

        dec, note = adapt_decoder(dec)
        if note and not args.json:
            eprint(note)
    ids = prompt_ids(lm, args.prompt, args.raw, args.system)
    if dec.strategy != "single":  # multi-row decoders: CoT, self-consistency, branching
        return _generate_multi(args, lm, dec, ids)
    from .decode.engine import generate
    from .decode.records import Request

    req = Request(prompt=ids, policy=dec.policy, max_tokens=args.max_tokens, seed=args.seed,
                  stop_ids=lm.tokenizer.stop_ids, top_logprobs=args.top_logprobs)
    entropic = "flowing" in dec.spec.states  # the entropix samplers, with or without attention
    colour = sys.stdout.isatty() and not args.no_color and entropic
    records, t0 = [], time.perf_counter()
    for rec in generate(lm.engine(dec.capture_layers), [req]):
        records.append(rec)
        if not args.json:
            sys.stdout.write(paint(rec.text, rec.state, colour))
            sys.stdout.flush()
    secs = time.perf_counter() - t0
    finish = records[-1].finish_reason if records else "length"
    if args.json:
        print(json.dumps({
            "model": lm.name, "sampler": dec.name, "prompt": args.prompt, "text": "".join(r.text for r in records),
            "tokens": [r.token for r in records], "finish_reason": finish,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(records),
                      "total_tokens": len(ids) + len(records)},
            "seconds": round(secs, 3), "records": [r.to_dict() for r in records]}))
        return 0
    sys.stdout.write("\n")
    if entropic:
        eprint(strategy_summary(records, dec.policy.states, colour))
    eprint(end_line(len(records), secs, finish))
    return 0


def end_line(tokens: int, secs: float, finish: str | None) -> str:
    """The closing line of every generate run (on stderr: stdout is only the answer)."""
    return f"[{tokens} tokens in {secs:.2f}s, {tokens / max(secs, 1e-9):.1f} tokens/s, finish: {finish}]"


def _generate_multi(args, lm, dec, ids: list[int]) -> int:
    from .decode.strategies import Task, decode, run

    found = prompt_answer_format(args.prompt)
    kind, pattern = found or ("number", None)  # the strategies' own default where the prompt names no format
    task = Task(prompts=[ids], max_tokens=[args.max_tokens], seeds=[args.seed], stop_ids=lm.tokenizer.stop_ids,
                kind=kind, pattern=pattern)
    on_record = None if args.json else _dot_per_row
    t0 = time.perf_counter()
    res = run(lm.engine(dec.capture_layers), decode(dec, task, lm.tokenizer, lm.config.max_position_embeddings),
              on_record)[0]
    secs = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res))
        return 0
    # Branching also runs for open-ended text (a story), where an "answer" would be whatever number
    # the reader stumbled on; CoT, self-consistency and auto exist to find an answer, so they always name one.
    print_branches(res, sys.stderr, show_answer=found is not None or dec.strategy != "branching")
    print(res["text"], flush=True)  # the chosen row alone, so the output pipes like greedy's
    chosen = res["branches"][res["choice"]] if res["branches"] else {}
    # tokens_generated counts every row the strategy decoded (probes and follow-ups too): the work behind the answer
    eprint(end_line(int(res.get("tokens_generated", 0)), secs, chosen.get("finish_reason") or "length"))
    return 0


def _dot_per_row(rec) -> None:
    if rec.finish_reason:  # progress, not output: stdout stays the answer
        sys.stderr.write(".")
        sys.stderr.flush()


def print_branches(res: dict[str, Any], stream, show_answer: bool = True) -> None:
    stream.write("\n")
    for b in res["branches"]:
        mark = "=>" if b["choice"] == res["choice"] else "  "
        text = " ".join(b["text"].split())
        if len(text) > 160:
            text = text[:157] + "..."
        stream.write(f"{mark} [{b['choice']:>2}] answer={b['answer']!s:<10} confidence={b['confidence']:.3f}  {text}\n")
    if show_answer:
        stream.write(f"answer: {res['answer']}\n")
    stream.flush()


# What a prompt asks for, read from its wording: (regex, answer kind, eval task format). The first match
# wins, so the narrower wordings (options, yes/no, comparisons) come before the generic number ones.
ANSWER_FORMATS = (
    (r"(?m)\(A\)[\s\S]*\(B\)|^\s*A[.)]\s[\s\S]*^\s*B[.)]\s", "option", None),  # "(A) .. (B)" or "A. .. B." lines
    (r"(?i)\byes\s*(?:or|/)\s*no\b", "pattern", "yesno"),
    (r"(?i)\bwhich\b[^?]*\b(?:larger|bigger|greater|higher)\b", "number", "compare"),
    (r"(?i)\b(?:sort|order|arrange)\b.*\b(?:smallest|largest|ascending|descending)\b", "list", None),
    (r"(?i)\b\w+ letter of\b", "text", None),
    (r"(?i)\bhow (?:many|much|long|far|old)\b|\b(?:calculate|compute|solve)\b|\bas a number\b"
     r"|\d\s*[-+*/\u00d7\u00f7^]\s*\(?\d", "number", None),
)


def prompt_answer_format(prompt: str) -> tuple[str, str | None] | None:
    """(kind, pattern) of the answer a prompt asks for, as eval's tasks define them; None when the
    prompt names no answer format (a story, an open question)."""
    from .evaluate.runner import answer_kind
    from .evaluate.tasks import Problem

    for rx, kind, fmt in ANSWER_FORMATS:
        if re.search(rx, prompt):  # the eval tasks' (kind, format) -> what the strategies look for
            return answer_kind(Problem(id="prompt", prompt=prompt, expected="", kind=kind,
                                       extra={"format": fmt} if fmt else {}))
    return None


def paint(text: str, state: str, colour: bool) -> str:
    c = STATE_COLOURS.get(state, "") if colour else ""
    return f"{c}{text}{RESET}" if c else text


def strategy_summary(records: Iterable[Any], states: tuple[str, ...], colour: bool = False) -> str:
    """A legend of the entropix strategies and how often each chose a token."""
    from .sampler.policy import LEGEND

    counts: dict[str, int] = {}
    for r in records:
        st = r.get("state") if isinstance(r, dict) else getattr(r, "state", None)
        counts[st or "?"] = counts.get(st or "?", 0) + 1
    total = sum(counts.values())
    legend = "legend: " + " | ".join(f"{paint(s, s, colour)} = {LEGEND[s]}" for s in states if s in LEGEND)
    order = [s for s in states if s in counts] + sorted(s for s in counts if s not in states)
    fired = ", ".join(f"{paint(s, s, colour)} {counts[s]} ({100 * counts[s] / total:.0f}%)" for s in order)
    return f"{legend}\nstrategies: {fired or 'none'}"


# -- chat -----------------------------------------------------------------------

def cmd_chat(args) -> int:
    from .decode.engine import generate
    from .decode.records import Request

    decoder_from_args(args)
    lm = load(args)
    dec = decoder_from_args(args, lm)
    if dec.strategy != "single":
        raise EntropixError(f"chat streams one answer; the {dec.name} sampler decodes several (use generate)")
    engine = lm.engine(dec.capture_layers)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    eprint("chat with the model; /reset clears the conversation, /quit or Ctrl-D leaves")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        req = Request(prompt=lm.tokenizer.encode_chat(messages), policy=dec.policy, max_tokens=args.max_tokens,
                      seed=args.seed, stop_ids=lm.tokenizer.stop_ids)
        reply = []
        try:
            for rec in generate(engine, [req]):
                reply.append(rec.text)
                sys.stdout.write(rec.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            engine.cancel(req.id)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


# -- bench, download ------------------------------------------------------------

def cmd_bench(args) -> int:
    from .bench import run_bench
    from .sampler import catalog

    for name in args.sampler or []:
        catalog.spec(name)
    if args.peer or args.modes:  # our weight modes against transformers and llama.cpp (bench_modes.py)
        from .bench_modes import parse_modes, run_modes_bench

        modes = parse_modes(args.modes)
        lm = load(args, quiet=True)
        result = run_modes_bench(lm, modes, args.peer or [], tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                                 repeats=args.repeats, rss=not args.no_rss)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    lm = load(args, quiet=True)
    result = run_bench(lm, tokens=args.tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                       samplers=args.sampler or [], branches=args.branches, baseline=not args.no_transformers)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


def cmd_download(args) -> int:
    from .io.source import download

    print(download(args.id))
    return 0


# -- main -----------------------------------------------------------------------

def _generate_parser(sub) -> None:
    from .sampler import catalog

    g = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    g.add_argument("prompt")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and per-token records")
    g.add_argument("--top-logprobs", type=int, default=5, help="alternatives recorded per token")
    g.add_argument("--no-color", action="store_true")
    g.add_argument("--branches", type=int, default=None,
                   help=f"cot: first-token branches (default {catalog.default_of('branches')})")
    g.add_argument("--aggregate", action="store_true", help="cot: choose by summed confidence per answer")
    g.add_argument("--samples", type=int, default=None,
                   help=f"self-consistency: number of samples (default {catalog.default_of('samples')})")
    g.add_argument("--branching", action="store_true", help="entropix: fork rows where the metrics say 'branch'")
    g.add_argument("--no-attention", action="store_true",
                   help="entropix from the logits alone, as the engine adapters run it (no attention metrics)")
    g.add_argument("--engine", default="entropix", choices=("entropix", "llama.cpp"),
                   help="who runs the model: our backend (default) or llama.cpp (a GGUF --model; pip install entropix[llamacpp])")
    g.set_defaults(fn=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="entropix", description="Entropy-guided decoding for Llama-family models.")
    ap.add_argument("--version", action="version", version=f"entropix {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    _generate_parser(sub)

    c = sub.add_parser("chat", help="interactive multi-turn chat")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None)
    c.set_defaults(fn=cmd_chat)

    b = sub.add_parser("bench", help="decode speed against transformers and between samplers")
    add_model_args(b)
    b.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    b.add_argument("--prompt-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--sampler", action="append", help="also time this sampler against greedy (entropix, cot)")
    b.add_argument("--branches", type=int, default=None, help="cot: first-token branches (default: the catalogue's)")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    b.add_argument("--json", action="store_true")
    b.add_argument("--peer", action="append", choices=("llama.cpp",),
                   help="also time llama.cpp (llama-cpp-python) on the same GGUF; implies --modes")
    b.add_argument("--modes", default=None,
                   help="our weight modes to compare, e.g. none,int8,int4,int4+compile (default with --peer: none,int8,int4)")
    b.add_argument("--no-rss", action="store_true", help="--modes: skip the peak-RSS subprocesses")
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("download", help="download a model from the Hugging Face hub")
    d.add_argument("id", help="hub id, e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    d.set_defaults(fn=cmd_download)

    from .evaluate.runner import register_cli as register_eval
    from .plan import register_cli as register_plan
    from .plot import register_cli as register_plot
    from .sampler.calibrate import register_cli as register_calibrate
    from .serve.cli import register_cli as register_serve

    for register in (register_calibrate, register_plot, register_serve, register_eval, register_plan):
        register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    try:
        return args.fn(args) or 0
    except EntropixError as e:
        eprint(f"entropix: error: {e}")
        return 2
    except KeyboardInterrupt:
        eprint("entropix: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for the user; ENTROPIX_DEBUG=1 shows it
        if os.environ.get("ENTROPIX_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        eprint(f"entropix: error: {type(e).__name__}: {msg} (set ENTROPIX_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())

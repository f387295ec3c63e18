"""The `entropix` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import EntropixError, __version__

STATE_COLOURS = {  # ANSI colours per sampler state, shared by every subcommand that streams
    "greedy": "", "sample": "",
    "flowing": "\033[38;5;250m", "treading": "\033[38;5;214m", "branch": "\033[38;5;45m",
    "resample": "\033[38;5;197m", "adaptive": "\033[38;5;120m", "pause": "\033[38;5;226m",
    "cot": "", "forced": "\033[38;5;45m",
}
RESET = "\033[0m"


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- shared options -------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file, Hugging Face folder, hub id, or 'default' (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default=None,
                   help="greedy, sample, entropix, cot, self-consistency (default: greedy, or sample when --temperature > 0)")
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--sampler-config", default=None, help="JSON profile of entropix sampler settings")


def load(args, quiet: bool = False):
    from .weights import load_model

    if not quiet:
        eprint(f"loading model {args.model or 'default (SmolLM2-135M-Instruct, embedded)'} ...")
    t = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not quiet)
    if not quiet:
        eprint(f"loaded {lm.name} ({lm.config.num_hidden_layers} layers, {lm.model.device}, "
               f"{str(lm.model.dtype).removeprefix('torch.')}) in {time.perf_counter() - t:.1f}s")
    return lm


def sampler_from_args(args, lm=None):
    from .sampling import check_params, make_sampler

    check_params(args.temperature, args.top_k, args.top_p, args.min_p)
    name = args.sampler
    if name is None:
        filters = any(v is not None for v in (args.top_k, args.top_p, args.min_p))
        name = "sample" if (args.temperature or 0) > 0 or (args.temperature is None and filters) else "greedy"
    if name == "sample" and args.temperature == 0:
        name = "greedy"
    if name == "entropix" and getattr(args, "branching", False):
        name = "entropix-branching"
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    extra = {}
    for k in ("sampler_config", "branches", "aggregate", "samples"):
        if getattr(args, k, None) not in (None, False):
            extra[k] = getattr(args, k)
    return name, make_sampler(name, lm=lm, **kw, **extra)


def prompt_ids(lm, text: str, raw: bool, system: str | None = None) -> list[int]:
    tok = lm.tokenizer
    if raw:
        return tok.encode(text)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.encode_chat(msgs)


# -- generate -------------------------------------------------------------------

def cmd_generate(args) -> int:
    from .generate import Engine, Request, generate

    if args.max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    lm = load(args, quiet=args.json)
    name, sampler = sampler_from_args(args, lm)
    ids = prompt_ids(lm, args.prompt, args.raw, args.system)
    runner = getattr(sampler, "run", None)
    if runner is not None:  # multi-row decoders (cot, self-consistency) drive the engine themselves
        engine = Engine(lm, capture_layers=getattr(sampler, "capture_layers", (-1,)))
        result = runner(engine, ids, max_tokens=args.max_tokens, seed=args.seed, stream=None if args.json else sys.stdout)
        if args.json:
            print(json.dumps(result))
        return 0
    req = Request(prompt=ids, sampler=sampler, max_tokens=args.max_tokens, seed=args.seed,
                  stop_ids=lm.tokenizer.stop_ids, top_logprobs=args.top_logprobs)
    colour = sys.stdout.isatty() and not args.no_color and name == "entropix"
    records, text, t0 = [], [], time.perf_counter()
    for rec in generate(Engine(lm, capture_layers=getattr(sampler, "capture_layers", (-1,))), [req]):
        records.append(rec)
        text.append(rec.text)
        if not args.json:
            c = STATE_COLOURS.get(rec.state, "") if colour else ""
            sys.stdout.write(f"{c}{rec.text}{RESET if c else ''}")
            sys.stdout.flush()
    secs = time.perf_counter() - t0
    finish = records[-1].finish_reason if records else "length"
    if args.json:
        out = {
            "model": lm.name, "sampler": name, "prompt": args.prompt, "text": "".join(text),
            "tokens": [r.token for r in records], "finish_reason": finish,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(records),
                      "total_tokens": len(ids) + len(records)},
            "seconds": round(secs, 3), "records": [r.to_dict() for r in records],
        }
        print(json.dumps(out))
        return 0
    sys.stdout.write("\n")
    summary = getattr(sampler, "summary", None)
    if summary is not None:
        eprint(summary(records, colour=colour))
    eprint(f"[{len(records)} tokens in {secs:.2f}s, {len(records) / max(secs, 1e-9):.1f} tokens/s, finish: {finish}]")
    return 0


# -- chat -----------------------------------------------------------------------

def cmd_chat(args) -> int:
    from .generate import Engine, Request, generate

    lm = load(args)
    name, sampler = sampler_from_args(args, lm)
    engine = Engine(lm)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    eprint("chat with the model; /reset clears the conversation, /quit or Ctrl-D leaves")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        ids = lm.tokenizer.encode_chat(messages)
        req = Request(prompt=ids, sampler=sampler, max_tokens=args.max_tokens, seed=args.seed,
                      stop_ids=lm.tokenizer.stop_ids)
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
    from .weights import download

    path = download(args.id)
    print(path)
    return 0


# -- main -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="entropix", description="Entropy-guided decoding for Llama-family models.")
    ap.add_argument("--version", action="version", version=f"entropix {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    g.add_argument("prompt")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and per-token records")
    g.add_argument("--top-logprobs", type=int, default=5, help="alternatives recorded per token")
    g.add_argument("--no-color", action="store_true")
    g.add_argument("--branches", type=int, default=None, help="cot: first-token branches (default 10)")
    g.add_argument("--aggregate", action="store_true", help="cot: choose by summed confidence per answer")
    g.add_argument("--samples", type=int, default=None, help="self-consistency: number of samples")
    g.add_argument("--branching", action="store_true", help="entropix: fork rows where the metrics say 'branch'")
    g.set_defaults(fn=cmd_generate)

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
    b.add_argument("--branches", type=int, default=10)
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("download", help="download a model from the Hugging Face hub")
    d.add_argument("id", help="hub id, e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    d.set_defaults(fn=cmd_download)

    for register in _extra_commands():
        register(sub)
    return ap


def _extra_commands():
    """Subcommands that live beside their concern (serve, eval, plot, calibrate)."""
    import importlib

    out = []
    for mod in ("entropix.entropix", "entropix.plot", "entropix.server", "entropix.evaluate.runner"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue  # that part is not built
            raise
        out.append(m.register_cli)
    return out


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

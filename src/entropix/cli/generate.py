"""`entropix generate`: one prompt, streamed to the terminal or as one JSON object."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .. import EntropixError
from ..answer_format import ANSWER_FORMATS, parse_answer_format, prompt_answer_format, resolve_answer_format
from ..decode.engine import generate
from ..decode.records import Request
from ..decode.strategies import Task, decode, run
from ..sampler import catalog
from .common import (add_model_args, add_sampling_args, decoder_from_args, end_line, eprint, load, paint,
                     prompt_ids, regime_summary, sampler_name)


def cmd_generate(args) -> int:
    if args.max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    decoder_from_args(args)  # bad sampler flags fail before the model loads
    _check_answer_format(args)
    _check_budget(args)
    if args.engine == "openai":
        from ..adapters.upstream import check_sampler

        check_sampler(sampler_name(args))
    lm = load(args, quiet=args.json)
    dec = decoder_from_args(args, lm)
    if args.engine == "llama.cpp":
        from ..adapters.llamacpp import adapt_decoder

        dec, note = adapt_decoder(dec)
        if note and not args.json:
            eprint(note)
    if args.engine == "openai":
        from ..adapters.upstream import check_policy

        check_policy(dec.policy, dec.name)
    ids = prompt_ids(lm, args.prompt, args.raw, args.system)
    if dec.strategy != "single":  # multi-row decoders: CoT, self-consistency, branching
        return _generate_multi(args, lm, dec, ids)
    req = Request(prompt=ids, policy=dec.policy, max_tokens=args.max_tokens, seed=args.seed,
                  stop_ids=lm.tokenizer.stop_ids, top_logprobs=args.top_logprobs)
    entropic = "flowing" in dec.spec.regimes  # the entropix samplers, with or without attention
    colour = sys.stdout.isatty() and not args.no_color and entropic
    records, t0 = [], time.perf_counter()
    for rec in generate(lm.engine(dec.capture_layers), [req]):
        records.append(rec)
        if not args.json:
            sys.stdout.write(paint(rec.text, rec.regime, colour))
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
        eprint(regime_summary(records, dec.policy.regimes, colour))
    eprint(end_line(len(records), secs, finish))
    return 0


def _check_answer_format(args) -> None:
    """A bad --answer-format fails before the model loads, as bad sampler flags do."""
    if args.answer_format is None:
        return
    parse_answer_format(args.answer_format)
    name = sampler_name(args)
    if catalog.spec(name).strategy == "single":  # only the strategies that find answers read one
        raise EntropixError(f"--answer-format applies to the multi-row samplers (cot, self-consistency, auto, "
                            f"--branching), not {name}")


def _check_budget(args) -> None:
    if args.token_budget is None:
        return
    if args.token_budget < 1:
        raise EntropixError(f"--token-budget must be at least 1, got {args.token_budget}")
    if catalog.spec(sampler_name(args)).strategy not in ("deepconf", "sc-early"):
        raise EntropixError("--token-budget takes --sampler deepconf or sc-early")


def _generate_multi(args, lm, dec, ids: list[int]) -> int:
    # The one reader the server and `entropix eval` use too: the user's format, else the prompt's wording.
    kind, pattern = resolve_answer_format(args.prompt, args.answer_format)
    found = args.answer_format is not None or prompt_answer_format(args.prompt) is not None
    task = Task(prompts=[ids], max_tokens=[args.max_tokens], seeds=[args.seed], stop_ids=lm.tokenizer.stop_ids,
                kind=kind, pattern=pattern, token_budget=args.token_budget)
    on_record = None if args.json else _dot_per_row
    t0 = time.perf_counter()
    res = run(lm.engine(dec.capture_layers), decode(dec, task, lm.tokenizer, lm.config.max_position_embeddings),
              on_record)[0]
    secs = time.perf_counter() - t0
    if args.json:
        chosen = res["branches"][res["choice"]] if res.get("branches") else {}
        print(json.dumps({**res, "tokens": chosen.get("tokens", [])}))  # the answer's row, as greedy's JSON has it
        return 0
    # Branching also runs for open-ended text (a story), where an "answer" would be whatever number
    # the reader stumbled on; CoT, self-consistency and auto exist to find an answer, so they always name one.
    print_branches(res, sys.stderr, show_answer=found or dec.strategy != "branching")
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



def register(sub) -> None:
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
                   help=f"self-consistency, deepconf, sc-early: number of samples (default "
                        f"{catalog.default_of('samples')}; deepconf and sc-early: 16)")
    g.add_argument("--token-budget", type=int, default=None, metavar="N",
                   help="deepconf, sc-early: the most tokens the samples may spend (later samples are left out)")
    g.add_argument("--answer-format", default=None, metavar="FORMAT",
                   help=f"what multi-row samplers look for in each row: {' | '.join(ANSWER_FORMATS)} "
                        "(default: read from the prompt's wording, else number)")
    g.add_argument("--branching", action="store_true", help="entropix: fork rows where the metrics say 'branch'")
    g.add_argument("--no-attention", action="store_true",
                   help="entropix from the logits alone, as the engine adapters run it (no attention metrics)")
    g.add_argument("--engine", default="entropix", choices=("entropix", "llama.cpp", "openai"),
                   help="who runs the model: our backend (default), llama.cpp (a GGUF --model; pip install "
                        "entropix[llamacpp]) or an OpenAI-compatible server (--base-url; greedy, cot, auto, "
                        "self-consistency)")
    g.add_argument("--base-url", default=None, help="--engine openai: the server's URL, e.g. http://127.0.0.1:8000/v1 "
                                                    "(key from ENTROPIX_UPSTREAM_API_KEY or OPENAI_API_KEY)")
    g.add_argument("--upstream-model", default=None, help="--engine openai: the model to ask (default: its first)")
    g.set_defaults(fn=cmd_generate)

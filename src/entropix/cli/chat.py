"""`entropix chat`: a multi-turn conversation on the terminal."""

from __future__ import annotations

import sys

from .. import EntropixError
from ..decode.engine import generate
from ..decode.records import Request
from .common import add_model_args, add_sampling_args, decoder_from_args, eprint, load


def cmd_chat(args) -> int:
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


def register(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None)
    c.set_defaults(fn=cmd_chat)

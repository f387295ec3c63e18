"""`entropix download`: a model from the Hugging Face hub."""

from __future__ import annotations

from ..io.source import download


def cmd_download(args) -> int:
    print(download(args.id))
    return 0


def register(sub) -> None:
    d = sub.add_parser("download", help="download a model from the Hugging Face hub")
    d.add_argument("id", help="hub id, e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    d.set_defaults(fn=cmd_download)

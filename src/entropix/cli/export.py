"""`entropix export`: any model entropix loads, written as a Hugging Face folder (for vLLM, transformers)."""

from __future__ import annotations

from pathlib import Path

from .. import EntropixError
from ..io.export import DEFAULT_SHARD_BYTES, EXPORT_DTYPES, check_destination, check_dtype, export, parse_size
from ..io.source import open_checkpoint
from .common import eprint


def cmd_export(args) -> int:
    if args.model and args.model_opt and args.model != args.model_opt:
        raise EntropixError(f"two models given: {args.model!r} and --model {args.model_opt!r}")
    spec = args.model or args.model_opt
    dtype = check_dtype(args.dtype)  # bad flags fail before the model is opened
    shard = parse_size(args.max_shard_size)
    check_destination(Path(args.out).expanduser(), args.force)
    ckpt = open_checkpoint(spec)
    eprint(f"exporting {spec or 'default (SmolLM2-135M-Instruct, embedded)'} to {args.out} ...")
    done = export(ckpt, Path(args.out), dtype=dtype, shard_bytes=shard, force=args.force)
    files = "model.safetensors" if done.files == 1 else f"{done.files} safetensors shards"
    print(f"wrote {done.folder}: {done.tensors} tensors, {done.dtype}, {done.nbytes / 1e6:.1f} MB in {files} "
          f"({ckpt.config.arch}, from {Path(ckpt.source).name}) in {done.seconds:.1f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a model (GGUF file, folder, hub id, default) as a Hugging Face folder")
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face folder, hub id, or 'default' (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", "-m", dest="model_opt", default=None, help="the same as MODEL")
    p.add_argument("--out", "-o", required=True, help="the folder to write (refused if not empty, unless --force)")
    p.add_argument("--dtype", default="auto",
                   help=f"{', '.join(EXPORT_DTYPES)}, or auto (the default: the checkpoint's own float type, "
                        "float32 for quantized GGUF blocks)")
    p.add_argument("--max-shard-size", default=f"{DEFAULT_SHARD_BYTES // 10**9}GB",
                   help="larger weights are split into shards of at most this size, with an index (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace the folder's contents (only once the export is done)")
    p.set_defaults(fn=cmd_export)

"""`entropix plan`: memory per device for a model split over N GPUs or over a TPU slice."""

from __future__ import annotations

import json

from .. import EntropixError
from ..plan import BUILTIN, DTYPE_BYTES, model_config, parse_devices, plan, report
from ..plan_tpu import is_tpu, parse_slice, tpu_plan, tpu_report


def cmd_plan(args) -> int:
    name, cfg = model_config(args.model)
    if args.context is not None and args.context < 1:
        raise EntropixError(f"--context must be at least 1, got {args.context}")
    if is_tpu(args.devices):
        t = tpu_plan(cfg, parse_slice(args.devices), args.dtype, args.kv_dtype, args.context)
        print(json.dumps(dict(t, model=name)) if args.json else tpu_report(name, t))
        return 0
    n, device_name, size = parse_devices(args.devices)
    p = plan(cfg, n, size, args.dtype, args.kv_dtype, args.context)
    print(json.dumps(dict(p, model=name)) if args.json else report(name, p, device_name))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory per device for a model split over N GPUs or a TPU slice, and the mesh")
    p.add_argument("--model", "-m", required=True,
                   help=f"config.json, model folder or file, or built in: {', '.join(BUILTIN)}")
    p.add_argument("--devices", required=True,
                   help="GPUs as COUNTxNAME-SIZEGB (8xH100-80GB), or a TPU slice: v4-N (N TensorCores), "
                        "v5e-N alias v5litepod-N, v6e-N (N chips), e.g. v4-16, v5e-8")
    p.add_argument("--dtype", default="bf16", help=f"weights: {', '.join(DTYPE_BYTES)} (default bf16)")
    p.add_argument("--kv-dtype", default=None, help="KV cache (default: the weights' dtype, bf16 below 2 bytes)")
    p.add_argument("--context", type=int, default=None, help="tokens per row (default: the model's context)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)

"""`entropix plan`: memory per device for a model split over N devices."""

from __future__ import annotations

import json

from .. import EntropixError
from ..plan import BUILTIN, DTYPE_BYTES, model_config, parse_devices, plan, report


def cmd_plan(args) -> int:
    name, cfg = model_config(args.model)
    n, device_name, size = parse_devices(args.devices)
    if args.context is not None and args.context < 1:
        raise EntropixError(f"--context must be at least 1, got {args.context}")
    p = plan(cfg, n, size, args.dtype, args.kv_dtype, args.context)
    print(json.dumps(dict(p, model=name)) if args.json else report(name, p, device_name))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory per device for a model split over N devices, and the TP degree")
    p.add_argument("--model", "-m", required=True,
                   help=f"config.json, model folder or file, or built in: {', '.join(BUILTIN)}")
    p.add_argument("--devices", required=True, help="COUNTxNAME-SIZEGB, e.g. 8xH100-80GB")
    p.add_argument("--dtype", default="bf16", help=f"weights: {', '.join(DTYPE_BYTES)} (default bf16)")
    p.add_argument("--kv-dtype", default=None, help="KV cache (default: the weights' dtype, bf16 below 2 bytes)")
    p.add_argument("--context", type=int, default=None, help="tokens per row (default: the model's context)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)

"""`entropix plan`: memory per device for a model split over N devices (tensor parallelism).

Numbers come from the model's config: parameter counts per weight, how each weight splits
over ranks (the same split as `backends/torch/tp.py`: query heads in balanced runs, each
rank keeping the KV heads its queries read, feed-forward units and vocabulary rows in
balanced runs, norms whole), bytes per parameter of the dtype, and the KV cache per token.
Dense Llama-style configs and DeepSeek-V2-style ones (multi-head latent attention, routed
and shared experts) are covered. Framework-free: no torch import. TPU slices, sized under the JAX
backend's sharding rules, are in plan_tpu.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import EntropixError

GIB = 1 << 30
DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
               "fp8": 1.0, "int8": 1.0, "q8_0": 34 / 32, "int4": 0.5, "q4_0": 18 / 32}
UTILIZATION = 0.90  # of a device's memory for weights and KV cache; the rest: CUDA context, activations
KV_SHARE = 0.5  # the recommended degree leaves at least this share of the usable memory to the KV cache

_LLAMA31 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
BUILTIN: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64),
    "llama-3.1-405b": dict(_LLAMA31, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128),
    "deepseek-v2": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                        num_key_value_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
                        first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                        tie_word_embeddings=False),
}
ALIASES = {"meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
           "meta-llama/llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
           "meta-llama/llama-3.1-405b": "llama-3.1-405b", "meta-llama/llama-3.1-405b-instruct": "llama-3.1-405b",
           "deepseek-ai/deepseek-v2": "deepseek-v2", "deepseek-ai/deepseek-v2-chat": "deepseek-v2",
           "deepseek-ai/deepseek-v2.5": "deepseek-v2", "deepseek-v2.5": "deepseek-v2"}


# -- how a model splits over ranks (shared with backends/torch/tp.py) ------------------------

def balanced(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part i of range(n) cut into `parts` contiguous runs whose sizes differ by one at most."""
    q, r = divmod(n, parts)
    lo = i * q + min(i, r)
    return lo, lo + q + (1 if i < r else 0)


def split_heads(H: int, Hkv: int, world: int, rank: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(query heads [lo, hi), the global KV head of each local KV head) of a rank."""
    group = H // Hkv
    if Hkv >= world:  # whole KV groups per rank: nothing is held twice
        lo, hi = balanced(Hkv, world, rank)
        return (lo * group, hi * group), tuple(range(lo, hi))
    lo, hi = balanced(H, world, rank)
    reads = [h // group for h in range(lo, hi)]
    distinct = sorted(set(reads))
    if len(reads) % len(distinct) == 0 and all(reads.count(k) == len(reads) // len(distinct) for k in distinct):
        return (lo, hi), tuple(distinct)  # local query heads still map onto local KV heads in even groups
    return (lo, hi), tuple(reads)  # uneven: one copy of a KV head per local query head


# -- per-rank counts ----------------------------------------------------------------------

@dataclass(frozen=True)
class RankCount:
    params: int  # parameters this rank holds
    kv_per_token: int  # KV-cache elements per token (all layers) on this rank


def _n(cfg: dict, key: str, default: Any = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise EntropixError(f"the config lacks {key!r}")
    return int(v)


def _dense_attention(cfg: dict, world: int, rank: int) -> tuple[int, int]:
    """(parameters, KV elements per token) of one layer's grouped-query attention on a rank."""
    C, H = _n(cfg, "hidden_size"), _n(cfg, "num_attention_heads")
    Hkv = _n(cfg, "num_key_value_heads", H)
    D = int(cfg.get("head_dim") or C // H)
    (lo, hi), kv = split_heads(H, Hkv, world, rank)
    return 2 * C * (hi - lo) * D + 2 * C * len(kv) * D, 2 * len(kv) * D


def _latent_attention(cfg: dict, world: int, rank: int) -> tuple[int, int]:
    """DeepSeek-V2's multi-head latent attention: the low-rank down projections and the cached
    latent (kv_lora_rank + rope dims per token) are whole on every rank; the up projections
    and o_proj split by heads."""
    C, H = _n(cfg, "hidden_size"), _n(cfg, "num_attention_heads")
    nope, rope, vd = _n(cfg, "qk_nope_head_dim"), _n(cfg, "qk_rope_head_dim"), _n(cfg, "v_head_dim")
    kv_rank, q_rank = _n(cfg, "kv_lora_rank"), cfg.get("q_lora_rank")
    lo, hi = balanced(H, world, rank)
    Hl = hi - lo
    q = C * Hl * (nope + rope) if not q_rank else C * int(q_rank) + int(q_rank) + int(q_rank) * Hl * (nope + rope)
    kv = C * (kv_rank + rope) + kv_rank + kv_rank * Hl * (nope + vd)
    return q + kv + Hl * vd * C, kv_rank + rope


def _mlp(cfg: dict, layer: int, world: int, rank: int) -> int:
    C = _n(cfg, "hidden_size")
    experts = int(cfg.get("n_routed_experts") or 0)
    dense = (not experts or layer < int(cfg.get("first_k_dense_replace", 0))
             or layer % int(cfg.get("moe_layer_freq", 1) or 1))
    if dense:
        lo, hi = balanced(_n(cfg, "intermediate_size"), world, rank)
        return 3 * C * (hi - lo)
    m = _n(cfg, "moe_intermediate_size")
    lo, hi = balanced(m, world, rank)  # every expert's hidden units split like a dense MLP's
    shared_lo, shared_hi = balanced(m * int(cfg.get("n_shared_experts") or 0), world, rank)
    return experts * 3 * C * (hi - lo) + 3 * C * (shared_hi - shared_lo) + experts * C  # + the router, whole


def rank_count(cfg: dict, world: int, rank: int) -> RankCount:
    """What rank `rank` of `world` holds of a model with HF config `cfg`."""
    C, V, L = _n(cfg, "hidden_size"), _n(cfg, "vocab_size"), _n(cfg, "num_hidden_layers")
    H = _n(cfg, "num_attention_heads")
    if world > H:
        raise EntropixError(f"{world} ranks are more than the model's {H} attention heads")
    attention = _latent_attention if cfg.get("kv_lora_rank") else _dense_attention
    attn, kv = attention(cfg, world, rank)
    params = sum(attn + _mlp(cfg, i, world, rank) + 2 * C for i in range(L))  # + the two norms, whole
    vlo, vhi = balanced(V, world, rank)
    params += (vhi - vlo) * C * (1 if cfg.get("tie_word_embeddings") else 2) + C  # embedding, head, final norm
    return RankCount(params, kv * L)


def total_params(cfg: dict) -> int:
    return rank_count(cfg, 1, 0).params


# -- the plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    tp: int
    weight_bytes: int  # per device (the rank that holds the most)
    kv_bytes_per_token: int  # per device, per row
    kv_bytes_per_1k: int  # per device, per 1024 tokens of one row
    kv_tokens: int  # tokens of KV cache (all rows together) that fit beside the weights
    batch_at_context: int  # rows of `context` tokens that fit
    fits: bool  # the weights fit, with room for some KV cache


def parse_devices(text: str) -> tuple[int, str, int]:
    """'8xH100-80GB' -> (8, 'H100-80GB', bytes per device). The size is the name's NNGB suffix
    (a GPU's 'GB' is GiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\S*?(\d+(?:\.\d+)?)\s*GB)\s*", text)
    if not m or int(m.group(1)) < 1:
        raise EntropixError(f"--devices {text!r}: expected COUNTxNAME-SIZEGB, e.g. 8xH100-80GB")
    return int(m.group(1)), m.group(2), int(float(m.group(3)) * GIB)


def option(cfg: dict, tp: int, device_bytes: int, dtype_bytes: float, kv_bytes: float, context: int) -> Option:
    ranks = [rank_count(cfg, tp, r) for r in range(tp)]
    weights = int(max(r.params for r in ranks) * dtype_bytes)
    per_token = int(max(r.kv_per_token for r in ranks) * kv_bytes)
    room = int(device_bytes * UTILIZATION) - weights
    tokens = max(room, 0) // per_token
    return Option(tp, weights, per_token, per_token * 1024, tokens, tokens // context, tokens > 0)


def degrees(cfg: dict, devices: int) -> list[int]:
    """Powers of two up to the device count (and the device count), at most one rank per head."""
    H = _n(cfg, "num_attention_heads")
    out = [t for t in (1 << i for i in range(12)) if t <= min(devices, H)]
    if devices <= H and devices not in out:
        out.append(devices)
    return out


def plan(cfg: dict, devices: int, device_bytes: int, dtype: str = "bf16", kv_dtype: str | None = None,
         context: int | None = None) -> dict[str, Any]:
    """Every degree's figures and the recommended one: the smallest whose weights leave at least
    KV_SHARE of the usable memory to the cache, else the smallest that holds one row of `context`,
    else the smallest the weights fit at all."""
    if dtype not in DTYPE_BYTES:
        raise EntropixError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_BYTES)})")
    kv_dtype = kv_dtype or (dtype if DTYPE_BYTES[dtype] >= 2 else "bf16")
    if kv_dtype not in DTYPE_BYTES:
        raise EntropixError(f"unknown KV dtype {kv_dtype!r}")
    ctx = int(context or cfg.get("max_position_embeddings") or 4096)
    opts = [option(cfg, t, device_bytes, DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype], ctx) for t in degrees(cfg, devices)]
    usable = device_bytes * UTILIZATION
    roomy = [o for o in opts if o.fits and o.weight_bytes <= (1 - KV_SHARE) * usable]
    one_row = [o for o in opts if o.batch_at_context >= 1]
    fitting = [o for o in opts if o.fits]
    best = next(iter(roomy or one_row or fitting), None)
    return {"params": total_params(cfg), "devices": devices, "device_bytes": device_bytes, "dtype": dtype,
            "kv_dtype": kv_dtype, "context": ctx, "utilization": UTILIZATION,
            "options": [asdict(o) for o in opts], "recommended_tp": best.tp if best else None}


# -- models ---------------------------------------------------------------------------------

def model_config(spec: str) -> tuple[str, dict[str, Any]]:
    """(name, HF-style config) of a built-in name or alias, a config.json, a model folder or file."""
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in BUILTIN:
        return key, BUILTIN[key]
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        try:
            return path.parent.name if path.name == "config.json" else path.stem, json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EntropixError(f"cannot read {path}: {e}") from None
    from .io.source import is_default, open_checkpoint

    if path.exists() or is_default(spec):  # a GGUF file, the embedded model: a dense config

        ckpt = open_checkpoint(spec)
        return ckpt.name, asdict(ckpt.config)
    raise EntropixError(f"unknown model {spec!r}: give a config.json, a model folder or file, or one of "
                        f"{', '.join(BUILTIN)}")


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def report(name: str, p: dict[str, Any], device_name: str) -> str:
    lines = [f"{name}: {p['params'] / 1e9:.2f}B parameters, weights {p['dtype']}, KV cache {p['kv_dtype']}, "
             f"on {p['devices']}x{device_name} ({_gb(p['device_bytes'])} each, {p['utilization']:.0%} usable)",
             f"{'tp':>4}  {'weights/device':>15}  {'KV/1k tokens/row':>17}  {'KV tokens that fit':>18}  "
             f"{'rows x ' + str(p['context']):>14}"]
    for o in p["options"]:
        mark = "  <- recommended" if o["tp"] == p["recommended_tp"] else ("" if o["fits"] else "  (weights do not fit)")
        lines.append(f"{o['tp']:>4}  {_gb(o['weight_bytes']):>15}  {o['kv_bytes_per_1k'] / (1 << 20):>13.1f} MiB  "
                     f"{o['kv_tokens']:>18,}  {o['batch_at_context']:>14,}{mark}")
    lines.append(f"(KV tokens: all rows together, beside the weights; rows x {p['context']}: rows of the full context)")
    if p["recommended_tp"] is None:
        lines.append("no degree fits: more or larger devices, or a smaller dtype (--dtype fp8, int4)")
    return "\n".join(lines)

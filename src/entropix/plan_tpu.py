"""`entropix plan` for TPU pod slices: memory per chip and per host under the JAX backend's sharding.

The JAX backend (`backends/jax/sharding.py`) places a model on a (dp, tp) mesh of chips. A weight
splits over "tp" only when the axis divides its split dimension (q/k/v and gate/up: output
features; o_proj and down_proj: input features; embedding and output head: vocabulary rows);
otherwise it, like every norm, is whole on each chip. The KV cache [B, S, Hkv, D] splits its rows
over "dp" and its KV heads over "tp" only when tp divides Hkv. Every dp replica holds all weights.

Slice names follow Cloud TPU: v4-N counts TensorCores (two per chip, four chips per host VM);
v5e-N (also v5litepod-N) and v6e-N count chips: up to 8 on one host VM, four per VM beyond that.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from . import EntropixError
from .plan import DTYPE_BYTES, GIB, KV_SHARE, UTILIZATION, _n, total_params

# generation -> (HBM bytes per chip, TensorCores per chip as the name's N counts them, most chips in a slice)
GENERATIONS = {"v4": (32 * GIB, 2, 4096), "v5e": (16 * GIB, 1, 256), "v6e": (32 * GIB, 1, 256)}
GEN_ALIASES = {"v5litepod": "v5e"}
JAX_DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")  # what the JAX loader casts to


@dataclass(frozen=True)
class TpuSlice:
    name: str  # canonical, e.g. "v5e-8"
    generation: str
    chips: int  # JAX devices (a v4 chip's two TensorCores act as one device)
    hosts: int  # host VMs, one JAX process each
    chips_per_host: int
    hbm_per_chip: int  # bytes


def is_tpu(text: str) -> bool:
    """Whether --devices names a TPU slice (GPU specs start with a count)."""
    return re.match(r"\s*v\d", text, re.IGNORECASE) is not None


def parse_slice(text: str) -> TpuSlice:
    """'v4-16' -> 8 chips on 2 hosts of 4, 32 GiB each; 'v5litepod-8' -> v5e-8, and so on."""
    m = re.fullmatch(r"\s*(v\w+?)-(\d+)\s*", text.lower())
    if not m:
        raise EntropixError(f"--devices {text!r}: expected a TPU slice GENERATION-N, e.g. v4-16, v5e-8, v6e-8")
    gen, n = GEN_ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in GENERATIONS:
        raise EntropixError(f"--devices {text!r}: unknown TPU generation {m.group(1)!r} "
                            "(known: v4, v5e alias v5litepod, v6e)")
    hbm, cores, most = GENERATIONS[gen]
    if cores == 2:
        if n % 8 or not 8 <= n <= 2 * most:  # whole hosts: 4 chips, 8 TensorCores
            raise EntropixError(f"--devices {text!r}: {gen}-N counts TensorCores, 2 per chip and 4 chips per "
                                f"host, so N is a multiple of 8 from 8 to {2 * most}")
        return TpuSlice(f"{gen}-{n}", gen, n // 2, n // 8, 4, hbm)
    if not (n == 1 or (4 <= n <= most and n & (n - 1) == 0)):
        raise EntropixError(f"--devices {text!r}: {gen}-N counts chips: N is 1 or a power of two from 4 to {most}")
    per_host = n if n <= 8 else 4  # an 8-chip slice is one VM; multi-host slices are VMs of 4 chips
    return TpuSlice(f"{gen}-{n}", gen, n, n // per_host, per_host, hbm)


# -- what one chip holds under the JAX sharding rules -----------------------------------------

def _dense_dims(cfg: dict) -> tuple[int, int, int, int, int, int, int]:
    if cfg.get("kv_lora_rank") or cfg.get("n_routed_experts"):
        raise EntropixError("the JAX backend (the one that runs on TPUs) takes dense Llama-style models only; "
                            "this config has latent attention or experts")
    C, H = _n(cfg, "hidden_size"), _n(cfg, "num_attention_heads")
    Hkv = _n(cfg, "num_key_value_heads", H)
    D = int(cfg.get("head_dim") or C // H)
    return C, _n(cfg, "intermediate_size"), _n(cfg, "vocab_size"), _n(cfg, "num_hidden_layers"), H, Hkv, D


def _part(size: int, split_dim: int, tp: int) -> int:
    """Elements on one chip of a weight of `size` elements whose sharded dimension has `split_dim` entries."""
    return size // tp if tp > 1 and split_dim % tp == 0 else size


def chip_params(cfg: dict, tp: int) -> int:
    """Parameters on every chip of a mesh with `tp` chips on its tensor-parallel axis."""
    C, F, V, L, H, Hkv, D = _dense_dims(cfg)
    attn = 2 * _part(H * D * C, H * D, tp) + 2 * _part(Hkv * D * C, Hkv * D, tp)  # q and o; k and v
    layer = attn + 3 * _part(F * C, F, tp) + 2 * C  # gate, up, down; the two norms whole
    heads = 1 if cfg.get("tie_word_embeddings") else 2
    return L * layer + heads * _part(V * C, V, tp) + C  # + embedding (and head), final norm


def chip_kv_heads(cfg: dict, tp: int) -> int:
    Hkv = _dense_dims(cfg)[5]
    return Hkv // tp if tp > 1 and Hkv % tp == 0 else Hkv


def chip_kv_per_token(cfg: dict, tp: int) -> int:
    """KV elements per token of one row on a chip that holds the row: keys and values, all layers."""
    _, _, _, L, _, _, D = _dense_dims(cfg)
    return 2 * L * chip_kv_heads(cfg, tp) * D


# -- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeshOption:
    tp: int
    dp: int
    weight_bytes: int  # per chip (every chip holds as much)
    weight_bytes_per_host: int
    kv_heads_per_chip: int
    kv_bytes_per_token: int  # per chip, one token of one row
    kv_bytes_per_1k: int  # per chip, 1024 tokens of one row
    kv_bytes_per_token_host: int  # the most one host holds of one token of one row
    kv_tokens_per_replica: int  # tokens (its rows together) a dp replica caches; each chip holds its heads of each
    kv_tokens_per_host: int  # tokens a host holds some heads of (the most over hosts)
    kv_tokens: int  # the whole slice: dp replicas
    rows_at_context: int  # rows of the full context over the slice
    fits: bool  # the weights fit, with room for some KV cache


def _replicas_on_a_host(s: TpuSlice, tp: int) -> int:
    """The most dp replicas one host has chips of (devices in order: tp contiguous, hosts contiguous)."""
    k = s.chips_per_host
    return max((h * k + k - 1) // tp - h * k // tp + 1 for h in range(s.hosts))


def mesh_option(cfg: dict, s: TpuSlice, tp: int, dtype_bytes: float, context: int) -> MeshOption:
    weights = int(chip_params(cfg, tp) * dtype_bytes)
    per_token = int(chip_kv_per_token(cfg, tp) * dtype_bytes)
    room = int(s.hbm_per_chip * UTILIZATION) - weights
    tokens = max(room, 0) // per_token
    dp = s.chips // tp
    return MeshOption(tp, dp, weights, weights * s.chips_per_host, chip_kv_heads(cfg, tp), per_token,
                      per_token * 1024, per_token * min(tp, s.chips_per_host), tokens,
                      tokens * _replicas_on_a_host(s, tp), tokens * dp, tokens // context * dp, tokens > 0)


def tpu_plan(cfg: dict, s: TpuSlice, dtype: str = "bf16", kv_dtype: str | None = None,
             context: int | None = None) -> dict[str, Any]:
    """Every tp x dp mesh over the slice's chips, and the recommended one: among the meshes whose
    replicas each hold a row of `context` tokens (else all whose weights fit), the smallest tp whose
    slice caches at least KV_SHARE of the most KV tokens any of them caches."""
    if dtype not in JAX_DTYPES:
        raise EntropixError(f"dtype {dtype!r}: the JAX backend holds weights in {', '.join(JAX_DTYPES)}")
    if kv_dtype is not None and DTYPE_BYTES.get(kv_dtype) != DTYPE_BYTES[dtype]:
        raise EntropixError(f"--kv-dtype {kv_dtype!r}: the JAX backend keeps the KV cache in the weights' dtype "
                            f"({dtype})")
    C, F, V, L, H, Hkv, D = _dense_dims(cfg)
    ctx = int(context or cfg.get("max_position_embeddings") or 4096)
    tps = [t for t in range(1, s.chips + 1) if s.chips % t == 0]
    opts = [mesh_option(cfg, s, t, DTYPE_BYTES[dtype], ctx) for t in tps]
    # a smaller tp means more replicas and fewer collectives, but where tp does not divide the KV
    # heads every chip caches all of them: capacity, not the share of memory, decides
    rows = [o for o in opts if o.fits and o.kv_tokens_per_replica >= ctx] or [o for o in opts if o.fits]
    top = max((o.kv_tokens for o in rows), default=0)
    best = next((o for o in rows if o.kv_tokens >= KV_SHARE * top), None)
    params = total_params(cfg)
    return {"accelerator": "tpu", "sharding": "jax", "slice": s.name, "generation": s.generation,
            "chips": s.chips, "hosts": s.hosts, "chips_per_host": s.chips_per_host,
            "hbm_per_chip": s.hbm_per_chip, "devices": s.chips, "device_bytes": s.hbm_per_chip,
            "params": params, "dtype": dtype, "kv_dtype": dtype, "context": ctx, "utilization": UTILIZATION,
            "weight_bytes_total": int(params * DTYPE_BYTES[dtype]),
            "kv_bytes_per_token_total": int(2 * L * Hkv * D * DTYPE_BYTES[dtype]), "kv_heads": Hkv,
            "options": [asdict(o) for o in opts],
            "recommended_tp": best.tp if best else None, "recommended_dp": best.dp if best else None}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def tpu_report(name: str, p: dict[str, Any]) -> str:
    """The plan as text: the slice, the model's totals, one line per mesh, the recommendation."""
    k = p["chips_per_host"]
    lines = [f"{name}: {p['params'] / 1e9:.2f}B parameters in {p['dtype']}: "
             f"weights {_gib(p['weight_bytes_total'])}, KV cache {_kib(p['kv_bytes_per_token_total'])} per token "
             f"({p['kv_bytes_per_token_total'] * 1024 / (1 << 20):.1f} MiB per 1k tokens), {p['kv_heads']} KV heads",
             f"{p['slice']}: {p['chips']} chips on {p['hosts']} host{'s' if p['hosts'] > 1 else ''} "
             f"({k} chips per host), {_gib(p['hbm_per_chip'])} HBM per chip ({p['utilization']:.0%} usable), "
             f"{_gib(p['hbm_per_chip'] * k)} per host; JAX sharding on a dp x tp mesh",
             f"{'tp x dp':>9}  {'weights/chip':>12}  {'weights/host':>12}  {'KV/1k tokens/chip':>17}  "
             f"{'KV tokens/replica':>17}  {'KV tokens/slice':>15}  {'rows x ' + str(p['context']):>13}"]
    for o in p["options"]:
        mark = ("  <- recommended" if o["tp"] == p["recommended_tp"] else "" if o["fits"] else "  (weights do not fit)")
        lines.append(f"{str(o['tp']) + ' x ' + str(o['dp']):>9}  {_gib(o['weight_bytes']):>12}  "
                     f"{_gib(o['weight_bytes_per_host']):>12}  {o['kv_bytes_per_1k'] / (1 << 20):>13.1f} MiB  "
                     f"{o['kv_tokens_per_replica']:>17,}  {o['kv_tokens']:>15,}  {o['rows_at_context']:>13,}{mark}")
    lines.append("(a replica is tp chips; each holds its share of the KV heads of all the replica's tokens: "
                 f"all {p['kv_heads']} heads where tp does not divide {p['kv_heads']})")
    best = next((o for o in p["options"] if o["tp"] == p["recommended_tp"]), None)
    if best is None:
        lines.append("no mesh fits: a larger slice, or a generation with more HBM per chip")
        return "\n".join(lines)
    room = p["hbm_per_chip"] * p["utilization"] - best["weight_bytes"]
    lines += [f"recommended: tp={best['tp']} x dp={best['dp']}",
              f"  per chip: weights {_gib(best['weight_bytes'])}, KV {_kib(best['kv_bytes_per_token'])} per token "
              f"({best['kv_heads_per_chip']} of the KV heads), {_gib(room)} left: "
              f"{best['kv_tokens_per_replica']:,} tokens",
              f"  per host ({k} chips): weights {_gib(best['weight_bytes_per_host'])}, KV "
              f"{_kib(best['kv_bytes_per_token_host'])} per token, {best['kv_tokens_per_host']:,} tokens"]
    if best["kv_tokens_per_replica"] < p["context"]:
        lines.append(f"no mesh holds a row of {p['context']:,} tokens: a shorter --context, or a larger slice")
    return "\n".join(lines)

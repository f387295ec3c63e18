"""The device mesh and the shardings of parameters (by path), the KV cache and the batch.

A Mesh has a data axis "dp" (batch rows) and a tensor-parallel axis "tp". Parameters are
placed by path, Megatron style: q/k/v and gate/up split their output features over "tp",
o_proj and down_proj their input features (so each pair needs one reduction), the
embedding and the output projection split the vocabulary. A dimension that the axis does
not divide stays whole (replicated), which is always correct; XLA's partitioner inserts the
collectives. The logits are gathered over "tp" before the sampler, which needs every
row's whole distribution for its entropy and its top-k.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ... import EntropixError

# (path pattern, which dimension goes over "tp"); paths as `param_path` spells them
RULES = (
    (r"layers\.\d+\.self_attn\.[qkv]_proj", 0),
    (r"layers\.\d+\.self_attn\.o_proj", 1),
    (r"layers\.\d+\.mlp\.(gate|up)_proj", 0),
    (r"layers\.\d+\.mlp\.down_proj", 1),
    (r"embed_tokens", 0),
    (r"lm_head", 0),
)


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A (dp, tp) mesh over the first dp * tp devices."""
    if tp < 1 or dp < 1:
        raise EntropixError(f"--tp and --dp must be at least 1, got tp={tp}, dp={dp}")
    devices = list(jax.devices() if devices is None else devices)
    if tp * dp > len(devices):
        raise EntropixError(f"a mesh of dp={dp} x tp={tp} needs {tp * dp} devices; {len(devices)} available "
                            f"(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count={tp * dp})")
    return Mesh(np.array(devices[:tp * dp]).reshape(dp, tp), ("dp", "tp"))


def param_path(path) -> str:
    """A pytree key path as a dotted name: layers.3.self_attn.q_proj."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", k))))
    return ".".join(parts)


def param_spec(name: str, shape: tuple[int, ...], tp: int) -> P:
    """The PartitionSpec of one parameter."""
    for pattern, dim in RULES:
        if re.fullmatch(pattern, name) and tp > 1 and shape[dim] % tp == 0:
            spec = [None] * len(shape)
            spec[dim] = "tp"
            return P(*spec)
    return P()  # norms, and anything the axis does not divide: on every device


def param_sharding(mesh: Mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, param_spec(name, shape, mesh.shape["tp"]))


def cache_sharding(mesh: Mesh, n_kv_heads: int) -> NamedSharding:
    """KV cache [B, S, Hkv, D]: rows over "dp", key/value heads over "tp" when they divide."""
    heads = "tp" if n_kv_heads % mesh.shape["tp"] == 0 and mesh.shape["tp"] > 1 else None
    return NamedSharding(mesh, P("dp", None, heads, None))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Per-row arrays ([B] or [B, ...]): rows over "dp", whole on every "tp" device (the
    logits too: this is where the vocabulary is gathered)."""
    return NamedSharding(mesh, P("dp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def row_bucket(n: int, dp: int) -> int:
    """Padded batch size: a multiple of dp, dp times a power of two, so that a growing batch
    compiles a handful of shapes and not one per size."""
    per = -(-max(n, 1) // dp)
    return dp * (1 << (per - 1).bit_length())

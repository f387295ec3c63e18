"""Building the JAX parameter pytree from a Checkpoint, one stored tensor at a time.

Each tensor is read through the framework-free checkpoint (io/checkpoint.py), converted to
the target dtype on the host and placed on the mesh with its sharding (sharding.py), so the
host holds at most one tensor beyond what is already on the devices.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ... import EntropixError
from ...config import ModelConfig
from ...io.checkpoint import Checkpoint, HostTensor
from . import sharding
from .model import rope_inv_freq

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}
_LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
          "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class JaxModel:
    """What a JAX backend computes with: config, parameters on a mesh, RoPE frequencies."""

    config: ModelConfig
    params: dict
    inv_freq: jax.Array
    mesh: Any  # jax.sharding.Mesh
    dtype: Any  # a jnp dtype

    @property
    def device(self) -> str:
        d = self.mesh.devices.flat[0]
        n = self.mesh.devices.size
        return f"{d.platform}" + (f" x{n} (dp={self.mesh.shape['dp']}, tp={self.mesh.shape['tp']})" if n > 1 else "")

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name (without ".weight") -> shape, for every parameter the model reads."""
    C, F, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    per = {"input_layernorm": (C,), "post_attention_layernorm": (C,), "self_attn.q_proj": (H * D, C),
           "self_attn.k_proj": (Hkv * D, C), "self_attn.v_proj": (Hkv * D, C), "self_attn.o_proj": (C, H * D),
           "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F)}
    out = {"embed_tokens": (V, C), "norm": (C,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (V, C)
    for i in range(cfg.num_hidden_layers):
        out.update({f"layers.{i}.{k}": s for k, s in per.items()})
    return out


def build(cfg: ModelConfig, get: Callable[[str], np.ndarray], mesh, dtype, freq_factors=None,
          progress: Callable | None = None) -> JaxModel:
    """The model from `get(name) -> host array` (names as in checkpoints, ".weight" included)."""
    flat = {}
    shapes = expected_shapes(cfg)
    items = list(shapes.items())
    for name, want in (progress(items) if progress else items):
        arr = np.asarray(get(name + ".weight"))
        if tuple(arr.shape) != want:
            raise EntropixError(f"weights do not fit the model: {name}.weight is {tuple(arr.shape)}, "
                                f"the config wants {want}")
        host = arr.astype(jnp.dtype(dtype), copy=False)
        flat[name] = jax.device_put(host, sharding.param_sharding(mesh, name, want))
    params: dict = {k: flat[k] for k in ("embed_tokens", "norm", "lm_head") if k in flat}
    params["layers"] = []
    for i in range(cfg.num_hidden_layers):
        layer: dict = {"self_attn": {}, "mlp": {}}
        for k in _LAYER:
            group, _, leaf = k.rpartition(".")
            (layer[group] if group else layer)[leaf] = flat[f"layers.{i}.{k}"]
        params["layers"].append(layer)
    inv = jax.device_put(rope_inv_freq(cfg, freq_factors), sharding.replicated(mesh))
    return JaxModel(cfg, params, inv, mesh, jnp.dtype(dtype))


def host_array(t: HostTensor) -> np.ndarray:
    """A numpy array of the stored values (bf16 bits viewed as ml_dtypes' bfloat16)."""
    if t.dtype == "bfloat16":
        return t.array.view(jnp.bfloat16)
    return t.array


def resolve_devices(device: str | None):
    """The devices a mesh may use: "auto" is JAX's default platform (TPU, GPU, else CPU)."""
    if device in (None, "auto"):
        return jax.devices()
    name = {"cuda": "gpu"}.get(str(device).split(":")[0], str(device).split(":")[0])
    try:
        return jax.devices(name)
    except RuntimeError:
        raise EntropixError(f"device {device!r} is not available to JAX (found: {jax.default_backend()})") from None


def resolve_dtype(dtype: str | None, platform: str, native: str = "float32"):
    """"auto": bf16 on TPU and GPU; on the CPU the stored dtype, fp16 widened to fp32."""
    if dtype in (None, "auto"):
        if platform == "cpu":
            return jnp.float32 if native == "float16" else DTYPES[native]
        return jnp.bfloat16
    if dtype not in DTYPES:
        raise EntropixError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load(ckpt: Checkpoint, device: str | None = "auto", dtype: str | None = "auto", tp: int = 1, dp: int = 1,
         progress: bool = True) -> JaxModel:
    """The checkpoint's model on a (dp, tp) mesh of `device`'s platform."""
    if ckpt.torch_files:
        raise EntropixError(f"{ckpt.source} holds pytorch_model*.bin weights, which only the torch backend reads")
    extra = ckpt.config.beyond_llama(window=False)  # its model is Llama's block, without a window
    if extra:
        raise EntropixError(f"the jax backend runs Llama-style models; this {ckpt.config.arch} model has "
                            f"{', '.join(extra)}: use --backend torch")
    devices = resolve_devices(device)
    mesh = sharding.make_mesh(tp, dp, devices)
    dt = resolve_dtype(dtype, devices[0].platform, ckpt.native_dtype)

    def bar(items):
        if not progress or not sys.stderr.isatty():
            return items
        from tqdm import tqdm

        return tqdm(items, desc=f"loading {ckpt.name}", unit="tensor", leave=False, file=sys.stderr)

    return build(ckpt.config, lambda name: host_array(ckpt.read(name)), mesh, dt, ckpt.rope_freq_factors, bar)

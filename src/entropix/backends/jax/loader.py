"""Building the JAX parameter pytree from a Checkpoint, one stored tensor at a time.

Each tensor is read through the framework-free checkpoint (io/checkpoint.py), converted to
the target dtype on the host and placed on the mesh with its sharding (sharding.py), so the
host holds at most one tensor beyond what is already on the devices. When the mesh spans
several processes (backends/jax/multihost.py), each process reads only the slices its own
devices hold: a host of a pod slice never reads the whole checkpoint.
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
        procs = len({d.process_index for d in self.mesh.devices.flat})
        return f"{d.platform}" + (f" x{n} (dp={self.mesh.shape['dp']}, tp={self.mesh.shape['tp']})" if n > 1 else "") \
            + (f" over {procs} processes" if procs > 1 else "")

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


# (name, dim, start, stop) -> host array: rows / columns [start, stop) of dimension dim
SliceReader = Callable[[str, int, int, int], np.ndarray]


def _check_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != want:
        raise EntropixError(f"weights do not fit the model: {name}.weight is {tuple(shape)}, "
                            f"the config wants {want}")


def _place_slices(name: str, want: tuple[int, ...], sh, dtype, get_slice: SliceReader, shape_of) -> jax.Array:
    """A parameter of a mesh over several processes, built from the slices this process's
    devices hold (replicas of one slice on several local devices read it once)."""
    _check_shape(name, shape_of(name + ".weight"), want)
    spec = tuple(sh.spec) + (None,) * (len(want) - len(sh.spec))
    dim = next((d for d, axis in enumerate(spec) if axis is not None), None)
    read: dict[tuple[int, int], np.ndarray] = {}

    def part(index: tuple[slice, ...]) -> np.ndarray:
        lo, hi, _ = index[dim].indices(want[dim]) if dim is not None else (0, want[0], 1)
        if (lo, hi) not in read:
            arr = get_slice(name + ".weight", 0 if dim is None else dim, lo, hi)
            read[(lo, hi)] = np.asarray(arr).astype(jnp.dtype(dtype), copy=False)
        return read[(lo, hi)]

    return jax.make_array_from_callback(want, sh, part)


def build(cfg: ModelConfig, get: Callable[[str], np.ndarray], mesh, dtype, freq_factors=None,
          progress: Callable | None = None, get_slice: SliceReader | None = None, shape_of=None) -> JaxModel:
    """The model from `get(name) -> host array` (names as in checkpoints, ".weight" included);
    with `get_slice` and `shape_of`, a mesh that spans processes reads only this one's slices."""
    flat = {}
    shapes = expected_shapes(cfg)
    items = list(shapes.items())
    partial = get_slice is not None and jax.process_count() > 1
    for name, want in (progress(items) if progress else items):
        sh = sharding.param_sharding(mesh, name, want)
        if partial:
            flat[name] = _place_slices(name, want, sh, dtype, get_slice, shape_of)
            continue
        arr = np.asarray(get(name + ".weight"))
        _check_shape(name, arr.shape, want)
        flat[name] = jax.device_put(arr.astype(jnp.dtype(dtype), copy=False), sh)
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

    return build(ckpt.config, lambda name: host_array(ckpt.read(name)), mesh, dt, ckpt.rope_freq_factors, bar,
                 lambda name, dim, lo, hi: host_array(ckpt.read_slice(name, dim, lo, hi)), ckpt.shape)

"""Loading a model for the MLX backend.

Folders (Hugging Face safetensors, `mlx-community` MLX folders, quantized ones included, and
hub ids once downloaded) are read by mlx-lm's own loader into its model zoo. GGUF files,
the embedded default model among them, are read through our framework-free Checkpoint
into mlx-lm's Llama modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ... import EntropixError
from ...config import ModelConfig
from ...io.checkpoint import Checkpoint, HostTensor
from .model import ARCHITECTURES, check_structure

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}


def resolve_device(device: str | None):
    """auto: the GPU (Metal) where there is one, else the CPU."""
    gpu = mx.metal.is_available()
    if device in (None, "auto"):
        return mx.gpu if gpu else mx.cpu
    if device == "cpu":
        return mx.cpu
    if device in ("gpu", "metal", "mps"):
        if not gpu:
            raise EntropixError(f"device {device!r} asked for, but this MLX has no Metal GPU")
        return mx.gpu
    raise EntropixError(f"unknown device {device!r} for the mlx backend (try auto, cpu, gpu)")


def resolve_dtype(dtype: str | None, device, native: str):
    """auto: on the CPU fp32 (its half-precision matmuls are slow); on Metal the stored
    dtype, fp16 for weights that are fp32 (a GGUF's dequantized ones)."""
    if dtype in (None, "auto"):
        if device == mx.cpu:
            return mx.float32
        return mx.float16 if native == "float32" else DTYPES.get(native, mx.float16)
    if dtype not in DTYPES:
        raise EntropixError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _host_to_mx(t: HostTensor, dtype) -> mx.array:
    if t.dtype == "bfloat16":  # raw bits in uint16: widen to fp32 bits
        a = (t.array.astype(np.uint32) << 16).view(np.float32)
    else:
        a = t.array
    return mx.array(a).astype(dtype)


def _rope_scaling(cfg: ModelConfig) -> dict | None:
    if cfg.rope_type != "llama3":
        return None
    return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}


class FreqRoPE:
    """RoPE with explicit per-frequency periods (GGUF's Llama-3 scaling as divisors)."""

    def __init__(self, dims: int, periods: mx.array) -> None:
        self.dims, self.periods = dims, periods

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self.periods)


def load_checkpoint(ckpt: Checkpoint, dtype) -> tuple[object, ModelConfig]:
    """mlx-lm's Llama model with the checkpoint's weights, converted one tensor at a time."""
    from mlx_lm.models import llama

    if ckpt.torch_files:
        raise EntropixError(f"{ckpt.source}: the mlx backend reads safetensors, not pytorch_model*.bin")
    cfg = ckpt.config
    args = llama.ModelArgs(model_type="llama", hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                           intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                           rms_norm_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size, head_dim=cfg.head_dim,
                           max_position_embeddings=cfg.max_position_embeddings,
                           num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta,
                           rope_scaling=_rope_scaling(cfg), tie_word_embeddings=cfg.tie_word_embeddings)
    model = llama.Model(args)
    weights = []
    for name in ckpt.names():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        weights.append((name if name == "lm_head.weight" else "model." + name, _host_to_mx(ckpt.read(name), dtype)))
        mx.eval(weights[-1][1])
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise EntropixError(f"{ckpt.source}: weights do not fit the model ({e})") from None
    if ckpt.rope_freq_factors is not None:
        d = cfg.head_dim
        periods = cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d) * ckpt.rope_freq_factors
        rope = FreqRoPE(d, mx.array(periods.astype(np.float32)))
        for block in model.model.layers:
            block.self_attn.rope = rope
    model.eval()
    return model, cfg


def _config_from(raw: dict, model) -> ModelConfig:
    """Our ModelConfig for an mlx-lm model (what the host engine and profiles read)."""
    text = raw.get("text_config", raw)
    heads = int(text["num_attention_heads"])
    attn = model.model.layers[0].self_attn
    return ModelConfig(
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text.get("intermediate_size", 0)), num_hidden_layers=len(model.model.layers),
        num_attention_heads=heads, num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(getattr(attn, "head_dim", 0) or text.get("head_dim") or int(text["hidden_size"]) // heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)), rope_theta=float(text.get("rope_theta") or _rope_fields(raw).get("rope_theta", 10000.0)),
        max_position_embeddings=int(text.get("max_position_embeddings") or 4096),
        tie_word_embeddings=not hasattr(model, "lm_head"), arch=str(raw.get("model_type", "llama")))


def _rope_fields(raw: dict) -> dict:
    """transformers 5 writes RoPE settings under `rope_parameters`; mlx-lm reads the older
    top-level `rope_theta` / `rope_scaling` and would fall back to its own default theta."""
    rope = raw.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    out = {} if "rope_theta" in raw or "rope_theta" not in rope else {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default" and not raw.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def load_folder(folder: Path, dtype_name: str | None, device):
    """An HF or MLX folder through mlx-lm: (model, config, tokenizer, dtype)."""
    from mlx_lm.utils import load_model

    from ...io.tokenizer import TextTokenizer

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EntropixError(f"{folder}: cannot read config.json ({e})") from None
    arch = str(raw.get("model_type", ""))
    if arch not in ARCHITECTURES:
        raise EntropixError(f"unsupported architecture {arch!r}: the mlx backend runs {', '.join(ARCHITECTURES)} models")
    try:
        model, _ = load_model(folder, model_config=_rope_fields(raw))
    except (FileNotFoundError, ValueError) as e:
        raise EntropixError(f"{folder}: mlx-lm cannot load it ({str(e).splitlines()[0]})") from None
    check_structure(model, arch)
    native = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    dtype = resolve_dtype(dtype_name, device, native)
    model.set_dtype(dtype)  # floating parameters only: quantized weights keep their packing
    model.eval()
    try:
        tok = TextTokenizer.from_dir(folder)
    except ValueError as e:
        raise EntropixError(str(e)) from None
    return model, _config_from(raw, model), tok, dtype


def load(spec: str | None, device: str | None = "auto", dtype: str | None = "auto",
         progress: bool = True) -> dict[str, Any]:
    """The fields of a LoadedModel for the mlx backend (entropix.loading builds it) from anything
    `--model` takes."""
    from ...io.source import DEFAULT_MODEL, is_default, looks_like_hub_id, open_checkpoint, resolve_model_path

    dev = resolve_device(device)
    mx.set_default_device(dev)  # MLX places arrays by a process-wide default
    path = resolve_model_path(spec)
    if path.is_dir():
        model, cfg, tok, dt = load_folder(path, dtype, dev)
        name = spec if looks_like_hub_id(spec or "") and not Path(spec).expanduser().exists() else path.name
        source = str(path)
    else:
        ckpt = open_checkpoint(spec)
        dt = resolve_dtype(dtype, dev, ckpt.native_dtype)
        model, cfg = load_checkpoint(ckpt, dt)
        name, tok, source = (DEFAULT_MODEL if is_default(spec) else ckpt.name), ckpt.tokenizer, ckpt.source
    return dict(name=name, config=cfg, tokenizer=tok, source=source, model=model,
                device="gpu" if dev == mx.gpu else "cpu", dtype=str(dt).removeprefix("mlx.core."))

"""Gemma 2 and Gemma 3 (text) configs: config.json normalised to one flat form, and the fields
Gemma adds, from config.json or GGUF metadata.

transformers fills a missing config.json field from its class defaults (Gemma 3 multimodal
folders keep a sparse `text_config`), so the defaults below are those classes' (v5.25).
"""

from __future__ import annotations

from typing import Any

from .. import EntropixError

GEMMA_ARCHS = ("gemma2", "gemma3_text", "gemma3")

_COMMON = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
               rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)
_DEFAULTS = {
    "gemma2": dict(_COMMON, max_position_embeddings=8192, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, rope_theta=10000.0),
    "gemma3_text": dict(_COMMON, vocab_size=262208, max_position_embeddings=131072, final_logit_softcapping=None,
                        attn_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                        sliding_window_pattern=6),
}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


def _text_part(cfg: dict[str, Any]) -> dict[str, Any]:
    """A multimodal `gemma3` config.json's language model (its `text_config`)."""
    text = dict(cfg.get("text_config") or {})
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise EntropixError(f"unsupported Gemma 3 text model {text['model_type']!r} (supported: gemma3_text)")
    for key in ("tie_word_embeddings",):  # stated on the outer config
        if key in cfg and key not in text:
            text[key] = cfg[key]
    return dict(text, model_type="gemma3_text")


def _flat_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 keeps RoPE per layer type (transformers 5) or as rope_theta / rope_local_base_freq /
    rope_scaling (older files): the global layers' as rope_parameters, the local base apart."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        full.setdefault("rope_theta", cfg["rope_theta"])
        local = (params.get("sliding_attention") or {})
        local_type = local.get("rope_type", "default") or "default"
        if local_type != "default":
            raise EntropixError(f"Gemma sliding layers with {local_type!r} RoPE scaling are not supported")
        out = dict(cfg, rope_parameters=full, rope_local_base_freq=local.get("rope_theta", cfg["rope_local_base_freq"]))
    else:
        scaling = dict(cfg.get("rope_scaling") or params)
        scaling.setdefault("rope_theta", cfg["rope_theta"])
        out = dict(cfg, rope_parameters=scaling)
    out.pop("rope_scaling", None)
    return out


def normalise_gemma(cfg: dict[str, Any]) -> dict[str, Any]:
    """A Gemma config.json dict with the text model's fields, defaults filled and RoPE flat."""
    if cfg.get("model_type") == "gemma3":
        cfg = _text_part(cfg)
    arch = cfg["model_type"]
    out = {**_DEFAULTS[arch], **{k: v for k, v in cfg.items() if v is not None or k.endswith("softcapping")}}
    if out.get("use_bidirectional_attention"):
        raise EntropixError("bidirectional Gemma models (EmbeddingGemma) are encoders, not text generators")
    if out["hidden_activation"] not in _ACTIVATIONS:
        raise EntropixError(f"unsupported Gemma activation {out['hidden_activation']!r} "
                            f"(supported: {', '.join(_ACTIVATIONS)})")
    if not out.get("layer_types"):
        n, every = int(out["num_hidden_layers"]), int(out.get("sliding_window_pattern", 2))
        out["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if arch == "gemma3_text":
        return _flat_rope(out)
    params = out.get("rope_parameters") or out.get("rope_scaling") or {}
    out["rope_parameters"] = {"rope_theta": out["rope_theta"], **params}
    out.pop("rope_scaling", None)
    return out


def gemma_hf_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma's fields from a normalised config.json dict."""
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        hidden_act=str(cfg["hidden_activation"]), norm_weight_offset=1.0,
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        attn_logit_softcapping=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_logit_softcapping=float(cfg.get("final_logit_softcapping") or 0.0),
        rope_local_theta=float(cfg.get("rope_local_base_freq") or 0.0),
        qk_norm=cfg["model_type"] == "gemma3_text", qkv_bias=bias, o_bias=bias,
    )


def _swa_layers(meta: dict[str, Any], p: str, n: int, every: int) -> tuple[int, ...]:
    """llama.cpp's rule: with a pattern of `every`, layer i slides unless i % every == every - 1;
    a file may state the pattern or a per-layer list of booleans instead."""
    stated = meta.get(p + "attention.sliding_window_pattern")
    if isinstance(stated, (list, tuple)):
        return tuple(i for i, s in enumerate(stated) if s)
    every = int(stated or every)
    return tuple(i for i in range(n) if i % every < every - 1)


def gemma_gguf_fields(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """Gemma's fields from GGUF metadata. llama.cpp's converter stores the norms with the 1 added,
    and scales queries by 1/sqrt(head dim), except on the 27B models (hidden / heads)."""
    p = f"{arch}."
    n = int(meta[p + "block_count"])
    hidden, heads = int(meta[p + "embedding_length"]), int(meta[p + "attention.head_count"])
    head_dim = int(meta.get(p + "attention.key_length") or hidden // heads)
    big = (arch, n) in (("gemma2", 46), ("gemma3", 62))
    out: dict[str, Any] = dict(
        arch=arch, hidden_act="gelu_pytorch_tanh", norm_weight_offset=0.0,
        query_pre_attn_scalar=float(hidden // heads if big else head_dim),
        attn_logit_softcapping=float(meta.get(p + "attn_logit_softcapping") or 0.0),
        final_logit_softcapping=float(meta.get(p + "final_logit_softcapping") or 0.0),
        qk_norm=arch == "gemma3",
    )
    window = int(meta.get(p + "attention.sliding_window") or 0)
    if window:
        layers = _swa_layers(meta, p, n, 2 if arch == "gemma2" else 6)
        out.update(sliding_window=window if layers else 0, sliding_layers=layers)
    if arch == "gemma3":  # llama.cpp: local layers turn at base 10k, unscaled, unless the file says
        out["rope_local_theta"] = float(meta.get(p + "rope.freq_base_swa") or 10000.0)
        if meta.get(p + "rope.scaling.type") == "linear":
            out.update(rope_type="linear", rope_factor=float(meta.get(p + "rope.scaling.factor", 1.0)))
    return out

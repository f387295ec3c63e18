"""What each model family adds to the Llama config: fields read from config.json or GGUF metadata.

Only the fields that differ from Llama's defaults are returned; `ModelConfig.replace` takes them.
"""

from __future__ import annotations

from typing import Any

from .. import EntropixError
from .gemma import GEMMA_ARCHS, gemma_gguf_fields, gemma_hf_fields


def _sliding(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """Mistral slides every layer when sliding_window is set; Qwen only with use_sliding_window,
    from layer max_window_layers on (or as its layer_types say)."""
    window = cfg.get("sliding_window")
    if arch.startswith("qwen") and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return {}
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif arch.startswith("qwen"):
        layers = tuple(range(int(cfg.get("max_window_layers", n)), n))
    else:
        layers = tuple(range(n))
    return {"sliding_window": int(window), "sliding_layers": layers} if layers else {}


def _yarn(rope: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    if (rope.get("rope_type") or rope.get("type")) != "yarn":
        return {}
    original = rope.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 2048)
    factor = rope.get("factor") or cfg.get("max_position_embeddings", 2048) / original
    return dict(rope_factor=float(factor), rope_original_max_position_embeddings=int(original),
                rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                rope_mscale=float(rope.get("mscale") or 0), rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
                rope_attention_factor=float(rope.get("attention_factor") or 0),
                rope_truncate=bool(rope.get("truncate", True)))


def _deepseek_v2(cfg: dict[str, Any]) -> dict[str, Any]:
    if int(cfg.get("moe_layer_freq", 1)) != 1:
        raise EntropixError(f"moe_layer_freq {cfg['moe_layer_freq']} is not supported (only 1)")
    nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
    experts = int(cfg.get("n_routed_experts") or 0)
    return dict(
        head_dim=nope + rope, num_key_value_heads=int(cfg["num_attention_heads"]),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0), kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(cfg["v_head_dim"]),
        n_routed_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)),
        topk_method=str(cfg.get("topk_method") or "greedy"),
        n_group=int(cfg.get("n_group") or 1), topk_group=int(cfg.get("topk_group") or 1),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def hf_family_fields(cfg: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """Fields beyond Llama's from a config.json dict (`rope`: its rope_scaling/rope_parameters)."""
    arch = cfg.get("model_type", "llama")
    out: dict[str, Any] = {**_sliding(cfg, arch), **_yarn(rope, cfg)}
    if arch == "qwen2":
        out.update(qkv_bias=True)
    elif arch in ("llama", "qwen3"):
        bias = bool(cfg.get("attention_bias", False))
        out.update(qkv_bias=bias, o_bias=bias)
    if arch == "qwen3":
        out.update(qk_norm=True)
    if arch == "deepseek_v2":
        out.update(_deepseek_v2(cfg))
    if arch in GEMMA_ARCHS:
        out.update(gemma_hf_fields(cfg))
    return out


def gguf_family_fields(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """Fields beyond Llama's from GGUF metadata (biases are found from the tensors instead)."""
    p = f"{arch}."
    out: dict[str, Any] = {}
    if meta.get(p + "attention.sliding_window"):
        out["sliding_window"] = int(meta[p + "attention.sliding_window"])
    if arch == "qwen3":
        out["qk_norm"] = True
    if meta.get(p + "rope.scaling.type") == "yarn":
        factor = float(meta.get(p + "rope.scaling.factor", 1.0))
        # llama.cpp stores 0.1 * mscale_all_dim as the YaRN log multiplier
        mul = float(meta.get(p + "rope.scaling.yarn_log_multiplier", 0.0))
        out.update(rope_type="yarn", rope_factor=factor, rope_mscale=mul / 0.1, rope_mscale_all_dim=mul / 0.1,
                   rope_original_max_position_embeddings=int(meta.get(p + "rope.scaling.original_context_length",
                                                                      meta.get(p + "context_length", 2048))))
    if arch == "deepseek2":
        out.update(_deepseek2_gguf(meta, p))
    if arch in ("gemma2", "gemma3"):
        out.update(gemma_gguf_fields(meta, arch))
    return out


def _deepseek2_gguf(meta: dict[str, Any], p: str) -> dict[str, Any]:
    heads = int(meta[p + "attention.head_count"])
    rope = int(meta[p + "rope.dimension_count"])
    # converters that split kv_b for llama.cpp's MLA path keep the per-head sizes under *_mla
    key = int(meta.get(p + "attention.key_length_mla") or meta[p + "attention.key_length"])
    value = int(meta.get(p + "attention.value_length_mla") or meta[p + "attention.value_length"])
    gating = int(meta.get(p + "expert_gating_func", 1))
    if gating != 1:
        raise EntropixError("this deepseek2 GGUF routes experts by sigmoid (DeepSeek-V3); only softmax is supported")
    return dict(
        head_dim=key, num_key_value_heads=heads, q_lora_rank=int(meta.get(p + "attention.q_lora_rank") or 0),
        kv_lora_rank=int(meta[p + "attention.kv_lora_rank"]), qk_nope_head_dim=key - rope, qk_rope_head_dim=rope,
        v_head_dim=value, n_routed_experts=int(meta.get(p + "expert_count") or 0),
        num_experts_per_tok=int(meta.get(p + "expert_used_count") or 0),
        n_shared_experts=int(meta.get(p + "expert_shared_count") or 0),
        moe_intermediate_size=int(meta.get(p + "expert_feed_forward_length") or 0),
        routed_scaling_factor=float(meta.get(p + "expert_weights_scale", 1.0)),
        first_k_dense_replace=int(meta.get(p + "leading_dense_block_count", 0)),
        norm_topk_prob=bool(meta.get(p + "expert_weights_norm", False)),
        **_gguf_groups(meta, p),
    )


def _gguf_groups(meta: dict[str, Any], p: str) -> dict[str, Any]:
    """Group-limited routing (DeepSeek-V2 proper), where the file states its groups."""
    groups = int(meta.get(p + "expert_group_count") or 1)
    if groups <= 1:
        return {}
    return dict(topk_method="group_limited_greedy", n_group=groups,
                topk_group=int(meta.get(p + "expert_group_used_count") or groups))

"""Where each family keeps its tensors: GGUF names per architecture, and tensors that a model
holds in another shape than checkpoints store them (DeepSeek's experts, stacked).

A "derived" tensor is a (shape, read) pair: read() builds the array from stored tensors.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..config import ModelConfig

Reader = Callable[[str], tuple[np.ndarray, str]]  # stored name -> (array, dtype name)
Derived = dict[str, tuple[tuple[int, ...], Callable[[], tuple[np.ndarray, str]]]]


def _stacked(read: Reader, parts: list[list[str]], axis: int) -> Callable[[], tuple[np.ndarray, str]]:
    """A reader of [stack over experts of (concatenation of `parts[e]` along `axis`)]."""
    def build() -> tuple[np.ndarray, str]:
        rows, dtype = [], "float32"
        for names in parts:
            arrays = []
            for n in names:
                a, dtype = read(n)
                arrays.append(a)
            rows.append(np.concatenate(arrays, axis) if len(arrays) > 1 else arrays[0])
        return np.stack(rows), dtype
    return build


def hf_expert_stacks(cfg: ModelConfig, stored: dict, shape_of: Callable[[str], tuple[int, ...]],
                     read: Reader) -> tuple[Derived, set[str]]:
    """DeepSeek folders keep `layers.i.mlp.experts.e.{gate,up,down}_proj.weight`; the model holds
    `experts.gate_up_proj` [E, 2F, C] and `experts.down_proj` [E, C, F]. Returns the derived
    tensors and the stored names they replace."""
    derived: Derived = {}
    used: set[str] = set()
    E = cfg.n_routed_experts
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}.mlp.experts."
        if not cfg.is_moe_layer(i) or f"{p}0.gate_proj.weight" not in stored:
            continue
        gu = [[f"{p}{e}.gate_proj.weight", f"{p}{e}.up_proj.weight"] for e in range(E)]
        down = [[f"{p}{e}.down_proj.weight"] for e in range(E)]
        Fd, C = shape_of(gu[0][0])
        derived[p + "gate_up_proj"] = ((E, 2 * Fd, C), _stacked(read, gu, 0))
        derived[p + "down_proj"] = ((E, C, Fd), _stacked(read, down, 0))
        used.update(n for names in gu + down for n in names)
    return derived, used


def language_model_part(stored: dict) -> dict:
    """A multimodal folder's (Gemma 3's) language model under our names: `language_model.model.x`
    (the Hub's layout) or `model.language_model.x` (transformers 5 in memory) becomes `x`,
    `language_model.lm_head.weight` `lm_head.weight`; the vision tower and projector are left out.
    `stored` is keyed with the leading "model." already removed."""
    out = {}
    for name, entry in stored.items():
        if name.startswith("language_model."):
            out[name.removeprefix("language_model.").removeprefix("model.")] = entry
        elif name == "lm_head.weight":
            out[name] = entry
    return out


# -- GGUF ---------------------------------------------------------------------------------

_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
# Gemma: norms on both sides of attention and of the MLP
_GEMMA_NORMS = {"input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight"}
_MLA = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_a_proj.weight": "attn_q_a.weight",
        "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight", "self_attn.q_b_proj.weight": "attn_q_b.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
        "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
        "self_attn.o_proj.weight": "attn_output.weight"}
_SHARED = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
           "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
           "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight"}


def gguf_layer_names(cfg: ModelConfig, arch: str, i: int) -> dict[str, tuple[str, int | None]]:
    """Layer i: our name -> (the GGUF name, heads to un-permute by or None). llama.cpp permutes
    Q/K rows only for its llama architecture; qwen2/qwen3 and gemma2/gemma3 (rotate-half) and
    deepseek2 (interleaved, as DeepSeek's own checkpoints) are stored as Hugging Face has them."""
    b = f"blk.{i}."
    out = {ours: (b + theirs, None) for ours, theirs in (_GEMMA_NORMS if cfg.gemma else _NORMS).items()}
    if cfg.mla:
        out.update({ours: (b + theirs, None) for ours, theirs in _MLA.items()})
    else:
        permute = arch in ("llama", "mistral")
        for ours, theirs in _ATTN.items():
            heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
            out[ours + ".weight"] = (b + theirs + ".weight", heads.get(ours) if permute else None)
            out[ours + ".bias"] = (b + theirs + ".bias", None)
        out["self_attn.q_norm.weight"] = (b + "attn_q_norm.weight", None)
        out["self_attn.k_norm.weight"] = (b + "attn_k_norm.weight", None)
    if cfg.is_moe_layer(i):
        out.update({ours: (b + theirs, None) for ours, theirs in _SHARED.items()})
    else:
        out.update({ours: (b + theirs, None) for ours, theirs in _MLP.items()})
    return out


def gguf_derived(cfg: ModelConfig, tensors: dict, read: Reader) -> Derived:
    """DeepSeek's stacked experts from ffn_{gate,up,down}_exps, and kv_b_proj from attn_k_b and
    attn_v_b where a converter split it for llama.cpp's MLA path."""
    derived: Derived = {}
    H, dn, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        if cfg.is_moe_layer(i) and b + "ffn_gate_exps.weight" in tensors:
            E, Fd, C = tensors[b + "ffn_gate_exps.weight"].array_shape

            def gate_up(b=b):
                (g, dtype), (u, _) = read(b + "ffn_gate_exps.weight"), read(b + "ffn_up_exps.weight")
                return np.concatenate([g, u], 1), dtype

            derived[p + "mlp.experts.gate_up_proj"] = ((E, 2 * Fd, C), gate_up)
            derived[p + "mlp.experts.down_proj"] = ((E, C, Fd), lambda b=b: read(b + "ffn_down_exps.weight"))
        if cfg.mla and b + "attn_kv_b.weight" not in tensors and b + "attn_k_b.weight" in tensors:
            def kv_b(b=b):
                (k, dtype), (v, _) = read(b + "attn_k_b.weight"), read(b + "attn_v_b.weight")  # [H, r, dn], [H, dv, r]
                w = np.concatenate([k.reshape(H, r, dn).transpose(0, 2, 1), v.reshape(H, dv, r)], 1)
                return np.ascontiguousarray(w.reshape(H * (dn + dv), r)), dtype

            derived[p + "self_attn.kv_b_proj.weight"] = ((H * (dn + dv), r), kv_b)
    return derived

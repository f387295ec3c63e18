"""Model configuration: a frozen dataclass with Hugging Face field names."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .. import EntropixError
from .families import gguf_family_fields, hf_family_fields
from .gemma import GEMMA_ARCHS, normalise_gemma

# HF `model_type`s and GGUF `general.architecture`s that entropix runs
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "gemma2", "gemma3_text", "gemma3")
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "deepseek2", "gemma2", "gemma3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Llama-3 frequency scaling; rope_type "default" means plain theta.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    # Which model code runs it: HF `model_type` / GGUF `general.architecture`.
    arch: str = "llama"
    # -- other families (defaults: Llama) --------------------------------------------------
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int = 0  # Mistral / Qwen: a key is seen while query - key < window (0: off)
    sliding_layers: tuple[int, ...] = ()  # which layers slide (all when sliding_window is set)
    # YaRN (rope_type "yarn")
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float = 0.0  # 0: from factor and the mscales
    rope_truncate: bool = True
    # DeepSeek-V2 multi-head latent attention (kv_lora_rank > 0 turns it on)
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeek-V2 mixture of experts (n_routed_experts > 0 turns it on, from layer first_k_dense_replace)
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    topk_method: str = "greedy"  # or "group_limited_greedy" (n_group, topk_group)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    # Gemma 2 / 3 (config/gemma.py); the defaults change nothing for the other families
    hidden_act: str = "silu"  # the MLP's gate: silu, gelu_pytorch_tanh (GeGLU) or gelu
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): 1 for Gemma's HF norms
    query_pre_attn_scalar: float = 0.0  # scores scaled by its ** -0.5 (0: 1/sqrt(head_dim))
    attn_logit_softcapping: float = 0.0  # cap * tanh(score / cap) before the softmax (0: off)
    final_logit_softcapping: float = 0.0  # the same on the output logits
    rope_local_theta: float = 0.0  # sliding layers' own RoPE base, unscaled (0: as every other layer)

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def gemma(self) -> bool:
        """Gemma's block: norms around attention and the MLP, embeddings scaled by sqrt(hidden)."""
        return self.arch in GEMMA_ARCHS

    @property
    def rope_dim(self) -> int:
        """How many dimensions of each query/key head RoPE turns."""
        return self.qk_rope_head_dim if self.mla else self.head_dim

    def beyond_llama(self, window: bool = True) -> list[str]:
        """What this model has that a Llama-style block lacks (a sliding window counts unless `window`
        says the caller handles it): a code path that runs only Llama's block refuses these."""
        return [name for name, on in (("q/k/v biases", self.qkv_bias or self.o_bias), ("q/k norms", self.qk_norm),
                                      ("a sliding window", self.sliding_window > 0 and not window),
                                      ("latent attention", self.mla), ("experts", self.n_routed_experts > 0),
                                      ("Gemma blocks", self.gemma)) if on]

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def slides(self, layer: int) -> bool:
        return self.sliding_window > 0 and (not self.sliding_layers or layer in self.sliding_layers)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise EntropixError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise EntropixError(f"unsupported rope scaling type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        if self.n_routed_experts and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise EntropixError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                                f"({self.n_routed_experts})")
        if self.n_routed_experts and (self.n_routed_experts % self.n_group or not 0 < self.topk_group <= self.n_group):
            raise EntropixError(f"{self.n_routed_experts} experts cannot form {self.n_group} groups of which "
                                f"{self.topk_group} are kept")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise EntropixError(f"unsupported MoE topk_method {self.topk_method!r} (supported: greedy, group_limited_greedy)")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict."""
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EntropixError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        try:
            if arch in GEMMA_ARCHS:
                cfg = normalise_gemma(cfg)
                arch = cfg["model_type"]
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_type=rope_type,
                rope_factor=float(rope.get("factor", 1.0)),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
                arch=arch,
            ).replace(**hf_family_fields(cfg, rope))
        except KeyError as e:
            raise EntropixError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], n_vocab: int) -> "ModelConfig":
        """Build from GGUF metadata (key -> value)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise EntropixError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
        p = f"{arch}."
        try:
            heads = int(meta[p + "attention.head_count"])
            hidden = int(meta[p + "embedding_length"])
            head_dim = int(meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count")
                           or hidden // heads)
            scaling = meta.get(p + "rope.scaling.type")
            return cls(
                vocab_size=int(meta.get(p + "vocab_size") or n_vocab),
                hidden_size=hidden,
                intermediate_size=int(meta[p + "feed_forward_length"]),
                num_hidden_layers=int(meta[p + "block_count"]),
                num_attention_heads=heads,
                num_key_value_heads=int(meta.get(p + "attention.head_count_kv") or heads),
                head_dim=head_dim,
                rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
                max_position_embeddings=int(meta.get(p + "context_length", 2048)),
                # GGUF files omit output.weight when it is tied; the loader decides.
                tie_word_embeddings=False,
                rope_type="default" if scaling in (None, "none", "linear") else str(scaling),
                rope_factor=float(meta.get(p + "rope.scaling.factor", 1.0)),
                arch=arch,
            ).replace(**gguf_family_fields(meta, arch))
        except KeyError as e:
            raise EntropixError(f"GGUF metadata lacks {e.args[0]!r}") from None

    def replace(self, **kw: Any) -> "ModelConfig":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return ModelConfig(**d)

"""Model configuration: a frozen dataclass with Hugging Face field names."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from . import EntropixError

SUPPORTED_ARCHITECTURES = ("llama", "mistral")


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

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise EntropixError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in ("default", "llama3"):
            raise EntropixError(f"unsupported rope scaling type {self.rope_type!r} (supported: default, llama3)")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict."""
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EntropixError(f"unsupported architecture {arch!r}: entropix runs llama-architecture models")
        try:
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
            )
        except KeyError as e:
            raise EntropixError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], n_vocab: int) -> "ModelConfig":
        """Build from GGUF metadata (key -> value)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EntropixError(f"unsupported GGUF architecture {arch!r}: entropix runs llama-architecture models")
        p = f"{arch}."
        try:
            heads = int(meta[p + "attention.head_count"])
            hidden = int(meta[p + "embedding_length"])
            head_dim = int(meta.get(p + "rope.dimension_count") or hidden // heads)
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
            )
        except KeyError as e:
            raise EntropixError(f"GGUF metadata lacks {e.args[0]!r}") from None

    def replace(self, **kw: Any) -> "ModelConfig":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return ModelConfig(**d)

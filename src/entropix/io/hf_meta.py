"""What a Hugging Face folder holds beside its weights, written from a checkpoint: config.json,
generation_config.json and the tokenizer files (transformers and vLLM read these).

config.json is checked by reading it back: `ModelConfig.from_hf` of what is written must give
the model entropix runs, else the export stops (a field no HF config can say is an error, not a
silently different model).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .. import EntropixError
from ..config import ModelConfig
from .checkpoint import Checkpoint
from .tokenizer import TextTokenizer

# model_type (GGUF's general.architecture where it differs) -> transformers' class
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
_GGUF_TYPES = {"deepseek2": "deepseek_v2"}
# a Hugging Face folder's tokenizer and generation files, copied as they are
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def target_config(ckpt: Checkpoint) -> ModelConfig:
    """The model as an HF config states it: GGUF names mapped, GGUF's RoPE divisors as Llama-3 scaling."""
    cfg = ckpt.config.replace(arch=_GGUF_TYPES.get(ckpt.config.arch, ckpt.config.arch))
    if ckpt.rope_freq_factors is not None:
        cfg = cfg.replace(**llama3_from_factors(cfg, np.asarray(ckpt.rope_freq_factors, np.float64)))
    return cfg


def llama3_from_factors(cfg: ModelConfig, factors: np.ndarray) -> dict[str, Any]:
    """Llama-3 rope_scaling that gives the divisors llama.cpp stores in rope_freqs.

    The divisor of frequency f is 1 / ((1 - s) / factor + s) with s = clip(old * f / 2pi - low) /
    (high - low)), linear in f: any (old, low, high) on the same line give the same model, so
    low = 1 (Meta's choice) is taken and old, high follow from the line's fit."""
    d = cfg.rope_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return {}  # all divisors 1: plain RoPE
    s = (1.0 / factors - 1.0 / factor) / (1.0 - 1.0 / factor)
    mid = (s > 1e-4) & (s < 1 - 1e-4)
    x = inv / (2 * math.pi)
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(x[mid], s[mid], 1)
    else:
        slope, icpt = 0.0, 0.0
    if not (slope > 0 and icpt < 0):
        raise EntropixError("this GGUF's rope_freqs are not Llama-3 RoPE scaling: no HF config can state them")
    high, old = float(1.0 - 1.0 / icpt), int(round(-slope / icpt))
    again = np.clip((old * x - 1.0) / (high - 1.0), 0, 1)
    if not np.allclose(1.0 / ((1 - again) / factor + again), factors, rtol=1e-3):
        raise EntropixError("this GGUF's rope_freqs are not Llama-3 RoPE scaling: no HF config can state them")
    return dict(rope_type="llama3", rope_factor=factor, rope_low_freq_factor=1.0, rope_high_freq_factor=high,
                rope_original_max_position_embeddings=old)


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_type == "llama3":
        return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}
    if cfg.rope_type == "yarn":
        out: dict[str, Any] = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
                               "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow,
                               "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale_all_dim}
        if cfg.rope_attention_factor:
            out["attention_factor"] = cfg.rope_attention_factor
        if not cfg.rope_truncate:
            out["truncate"] = False
        return out
    return None


def _family_fields(cfg: ModelConfig) -> dict[str, Any]:
    """What each family's config.json says beyond Llama's fields."""
    n, arch = cfg.num_hidden_layers, cfg.arch
    out: dict[str, Any] = {}
    if arch in ("llama", "qwen3"):
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if arch == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    if arch in ("qwen2", "qwen3"):
        slides = [i for i in range(n) if cfg.slides(i)]
        out.update(use_sliding_window=bool(slides), sliding_window=cfg.sliding_window or None,
                   max_window_layers=slides[0] if slides else n)
        if slides and slides != list(range(slides[0], n)):  # not one run up to the last layer
            out["layer_types"] = ["sliding_attention" if i in slides else "full_attention" for i in range(n)]
    if arch == "deepseek_v2":
        out.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                   qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   v_head_dim=cfg.v_head_dim, n_routed_experts=cfg.n_routed_experts or None,
                   num_experts_per_tok=cfg.num_experts_per_tok or None, n_shared_experts=cfg.n_shared_experts or None,
                   moe_intermediate_size=cfg.moe_intermediate_size, routed_scaling_factor=cfg.routed_scaling_factor,
                   first_k_dense_replace=cfg.first_k_dense_replace, moe_layer_freq=1, topk_method=cfg.topk_method,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                   scoring_func="softmax", attention_bias=False)
    return out


# a source config.json's keys that would say something else than the export does
_DROPPED = ("dtype", "torch_dtype", "rope_parameters", "auto_map", "quantization_config", "layer_types")


def hf_config(cfg: ModelConfig, dtype: str, tok: TextTokenizer | None, base: dict | None = None) -> dict[str, Any]:
    """config.json for `cfg`, its weights stored as `dtype`, over a source folder's own config.json
    (`base`: fields entropix does not read are kept); checked by reading it back."""
    if cfg.arch not in ARCHITECTURES:
        raise EntropixError(f"cannot export a {cfg.arch!r} model (exportable: {', '.join(ARCHITECTURES)})")
    out: dict[str, Any] = {k: v for k, v in (base or {}).items() if k not in _DROPPED}
    out |= {
        "architectures": [ARCHITECTURES[cfg.arch]], "model_type": cfg.arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_scaling": _rope_scaling(cfg), "torch_dtype": dtype,
        "bos_token_id": tok.bos_id if tok else None, "eos_token_id": tok.eos_id if tok else None,
        **_family_fields(cfg),
    }
    if base and "eos_token_id" in base:  # a folder's own stop tokens (a list, maybe) stand
        out.update(bos_token_id=base.get("bos_token_id"), eos_token_id=base["eos_token_id"])
    back = ModelConfig.from_hf(json.loads(json.dumps(out)))
    if back != cfg:
        diff = [f"{k}={getattr(cfg, k)!r}" for k in cfg.__dataclass_fields__ if getattr(back, k) != getattr(cfg, k)]
        raise EntropixError(f"a {cfg.arch} config.json cannot state this model's {', '.join(diff)}")
    return out


def generation_config(tok: TextTokenizer) -> dict[str, Any]:
    """bos / eos as generation_config.json states them: every stop token, eos first."""
    stops = [tok.eos_id] if tok.eos_id is not None else []
    stops += sorted(i for i in tok.stop_ids if i not in stops)
    return {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}


def _engine_json(tok: TextTokenizer) -> dict[str, Any]:
    """tokenizer.json of the encoding engine, with BOS prepended by its post-processor where the
    model starts every text with it (transformers adds special tokens through the post-processor)."""
    spec = json.loads(tok._engine.to_str())  # the same package's tokenizer: no public accessor
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.token_text(tok.bos_id)
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        }
    return spec


def tokenizer_config(tok: TextTokenizer, max_len: int) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast tokenizer, bos / eos, and the chat template the model
    is prompted with (its own, else the family's default that entropix renders)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else None,
        "eos_token": tok.token_text(tok.eos_id) if tok.eos_id is not None else None,
        "add_bos_token": tok.add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding gives back the text exactly
        "model_max_length": max_len,
        "chat_template": tok.chat_template or tok.fallback_template,
    }


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(ckpt: Checkpoint, tok: TextTokenizer, folder: Path, max_len: int) -> None:
    """A folder's own tokenizer files are copied; otherwise (a GGUF, a tiktoken folder) they are built."""
    src = Path(ckpt.source)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
        if (src / "tokenizer.json").is_file():
            return
    write_json(folder / "tokenizer.json", _engine_json(tok))
    write_json(folder / "tokenizer_config.json", tokenizer_config(tok, max_len))
    if not (folder / "generation_config.json").is_file():
        write_json(folder / "generation_config.json", generation_config(tok))

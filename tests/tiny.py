"""Tiny random Llama checkpoints that tests write themselves (HF folder and GGUF)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

VOCAB = 49152  # the embedded tokenizer's vocabulary, reused by tiny models


def hf_config(**over) -> dict:
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    cfg.update(over)
    return cfg


def write_hf_model(folder: Path, gguf_path: Path, seed: int = 0, **over) -> Path:
    """A random LlamaForCausalLM saved by transformers, with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**hf_config(**over))
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than default init so that logits vary visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    gguf_tokenizer(gguf_path).save_pretrained(folder)
    return folder


@lru_cache(maxsize=2)
def gguf_tokenizer(gguf_path: Path):
    """transformers' tokenizer of a GGUF file, built once per session (it takes seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved RoPE pairs), the inverse of what loaders undo."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf(folder: Path, out: Path, embedded_gguf: Path, qtype: str = "F32") -> Path:
    """Write the HF folder's weights as a GGUF file (tensor types F32, F16 or Q8_0)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    # tokenizer: copy the embedded model's
    from entropix.io.gguf import read_gguf

    meta, _, _ = read_gguf(embedded_gguf)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(meta["tokenizer.chat_template"])

    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def put(name: str, arr: np.ndarray, quant: bool = True) -> None:
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if quant and qt != gguf.GGMLQuantizationType.F32 and arr.ndim == 2:
            data = gguf.quants.quantize(arr, qt)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"], quant=False)
    put("output.weight", sd["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"blk.{i}."
        put(q + "attn_q.weight", permute_for_gguf(sd[p + "self_attn.q_proj.weight"], H))
        put(q + "attn_k.weight", permute_for_gguf(sd[p + "self_attn.k_proj.weight"], Hkv))
        put(q + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(q + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(q + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(q + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(q + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        put(q + "attn_norm.weight", sd[p + "input_layernorm.weight"], quant=False)
        put(q + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], quant=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_safetensors_copy(src: Path, dst: Path, dtype: torch.dtype | None = None, drop: tuple[str, ...] = (),
                           shards: int = 1) -> Path:
    """`src`'s weights re-saved with safetensors (cast to `dtype`, without the tensors in
    `drop`, split over `shards` files with an index when more than one), beside copies of
    its config and tokenizer files."""
    import shutil

    from safetensors.torch import load_file, save_file

    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items() if k not in drop}
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json"):
        if f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    if shards == 1:
        save_file(sd, str(dst / "model.safetensors"))
        return dst
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: sd[k] for k in part}, str(dst / file))
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst

"""Tiny random Llama checkpoints that tests write themselves (HF folder and GGUF)."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
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
    save_gguf_tokenizer(gguf_path, folder)
    return folder


@contextmanager
def gguf_read_once():
    """transformers' GGUF loading as it is, minus repeated work: it parses a file's metadata (49k
    token strings for the embedded model) once for the config and again for the weights, and builds
    the gguf package's tensor-name map anew for every tensor. Both are pure functions of their
    arguments, so memoising them changes nothing transformers reads; it halves the reference's
    load time. The gguf package's own names come back on exit."""
    import gguf

    real_reader, real_map, readers = gguf.GGUFReader, gguf.get_tensor_name_map, {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


@lru_cache(maxsize=2)
def gguf_tokenizer(gguf_path: Path):
    """transformers' tokenizer of a GGUF file, built once per session (it takes seconds)."""
    from transformers import AutoTokenizer

    with gguf_read_once():
        return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# Set by tests/conftest.py: a cache folder that test processes share, this run's and later ones'
# (pytest-xdist's workers too). transformers takes ~10 s to build a GGUF file's tokenizer; the files
# of the first build are copied from there (keyed by the GGUF file and the transformers version).
SHARED_DIR: Path | None = None


def _saved_gguf_tokenizer(gguf_path: Path) -> Path | None:
    """transformers' tokenizer of `gguf_path` saved in SHARED_DIR (built there by the first process
    that asks, under a file lock); None without a usable SHARED_DIR."""
    if SHARED_DIR is None:
        return None
    import transformers
    from filelock import FileLock

    try:
        SHARED_DIR.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    saved = SHARED_DIR / f"tokenizer-{file_key(gguf_path)}-transformers{transformers.__version__}"
    with FileLock(str(saved) + ".lock"):
        if not saved.is_dir():
            part = saved.with_name(saved.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            gguf_tokenizer(gguf_path).save_pretrained(part)
            part.rename(saved)
    return saved


@lru_cache(maxsize=8)
def file_key(path: Path) -> str:
    """The file's name, size and a digest of its first and last MiB: the same file under another
    install (another mtime, another folder) keeps its key."""
    import hashlib

    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{size}-{h.hexdigest()[:16]}"


def save_gguf_tokenizer(gguf_path: Path, folder: Path) -> None:
    """transformers' tokenizer of `gguf_path` saved into `folder` (what gguf_tokenizer(...).save_pretrained writes)."""
    saved = _saved_gguf_tokenizer(gguf_path)
    if saved is None:
        gguf_tokenizer(gguf_path).save_pretrained(folder)
        return
    for f in saved.iterdir():
        shutil.copy(f, folder / f.name)


def hf_gguf_tokenizer(gguf_path: Path):
    """transformers' tokenizer of `gguf_path`, read back from its saved files (fast after the first
    build of the run); gguf_tokenizer is transformers' own GGUF reading, for tests of that."""
    from transformers import AutoTokenizer

    saved = _saved_gguf_tokenizer(gguf_path)
    return gguf_tokenizer(gguf_path) if saved is None else AutoTokenizer.from_pretrained(saved)


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


# -- other families: Mistral, Qwen2, Qwen3, DeepSeek-V2 ---------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
            "<s>", "</s>"]
_CORPUS = ("The quick brown fox jumps over the lazy dog. Entropy measures how uncertain a model is. "
           "Tom has 3 apples and buys 4 more, so he has 7 apples. 12 + 30 = 42. The answer is 42. "
           "Once upon a time there was a small language model that liked numbers and stories.")

# odd sizes on purpose: GQA ratio 3, head_dim (12) not hidden / heads (48 / 6 = 8), 3 layers
_DENSE = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6, rope_theta=10000.0,
              max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DENSE, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DENSE)),
    # Qwen's own sliding window: on from layer max_window_layers
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DENSE, use_sliding_window=True, sliding_window=6,
                                                               max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DENSE)),
    # DeepSeek-V2-Lite's shape: no q LoRA, greedy top-k; 4 experts, top-2, 1 shared, 1 dense layer, YaRN
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=48, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=3, num_attention_heads=3,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=1.5, kv_lora_rank=20, q_lora_rank=None, qk_nope_head_dim=10, qk_rope_head_dim=8,
        v_head_dim=12, rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})),
    # DeepSeek-V2's shape: q through a LoRA, group-limited routing, mscale != mscale_all_dim
    "deepseek_v2_full": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=48, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=2, num_attention_heads=3,
        n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
        routed_scaling_factor=2.0, topk_method="group_limited_greedy", n_group=3, topk_group=2,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
        rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                      "mscale": 1.0, "mscale_all_dim": 0.5})),
}
CHAT_TEMPLATES = {
    "qwen": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "deepseek": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n\\n' }}"
                 "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
                 "{% else %}{{ m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
}


@lru_cache(maxsize=1)
def small_tokenizer():
    """A byte-level BPE of ~400 tokens trained on a few sentences, with the families' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return tok


def _save_tokenizer(folder: Path, family: str) -> None:
    from transformers import PreTrainedTokenizerFast

    style = "qwen" if family.startswith("qwen") else "deepseek" if family.startswith("deepseek") else "mistral"
    bos, eos = {"qwen": (None, "<|im_end|>"), "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
                "mistral": ("<s>", "</s>")}[style]
    fast = PreTrainedTokenizerFast(tokenizer_object=small_tokenizer(), bos_token=bos, eos_token=eos,
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATES[style]
    fast.save_pretrained(folder)


def write_family_model(folder: Path, family: str, seed: int = 0, **over) -> Path:
    """A random checkpoint of `family` (a key of FAMILIES) saved by transformers, with a small tokenizer.

    Weights are larger than the default init so that logits and routing vary visibly; the
    special tokens' output rows are zero so that greedy decoding never stops early.
    """
    import transformers

    cfg_name, model_name, kw = FAMILIES[family]
    tok = small_tokenizer()
    cfg = getattr(transformers, cfg_name)(vocab_size=tok.get_vocab_size(), bos_token_id=None,
                                          eos_token_id=tok.token_to_id("<|im_end|>"), **{**kw, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:  # biases
                p.normal_(0, 0.1)
        for s in SPECIALS:
            model.lm_head.weight[tok.token_to_id(s)] = 0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder, family)
    return folder


def _gguf_tokenizer_meta(w, family: str) -> None:
    """The small tokenizer as GGUF metadata (byte-level BPE, specials as control tokens)."""
    tok = small_tokenizer()
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"]: a["id"] for a in spec["added_tokens"]}
    for s, i in specials.items():
        if i >= len(tokens):
            tokens.append(s)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(specials["<|im_end|>"])
    style = "qwen" if family.startswith("qwen") else "deepseek"
    w.add_chat_template(CHAT_TEMPLATES[style])


def write_family_gguf(folder: Path, out: Path, split_kv_b: bool = False) -> Path:
    """A qwen2 / qwen3 / deepseek2 GGUF file of a write_family_model folder, F32, named as the
    `gguf` package names the tensors (experts as 3D tensors; kv_b split into k_b and v_b, as
    llama.cpp's newer converters do, with split_kv_b)."""
    import gguf
    from gguf import MODEL_TENSOR as T
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    sd = {k.removeprefix("model."): v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    arch = {"qwen2": "qwen2", "qwen3": "qwen3", "deepseek_v2": "deepseek2"}[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    a = arch + "."
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    w.add_uint32(a + "block_count", L)
    w.add_uint32(a + "context_length", cfg["max_position_embeddings"])
    w.add_uint32(a + "embedding_length", cfg["hidden_size"])
    w.add_uint32(a + "feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(a + "attention.head_count", H)
    w.add_uint32(a + "attention.head_count_kv", cfg["num_key_value_heads"])
    w.add_float32(a + "rope.freq_base", cfg["rope_parameters"]["rope_theta"])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_uint32(a + "vocab_size", cfg["vocab_size"])
    if arch != "deepseek2":
        w.add_uint32(a + "attention.key_length", cfg["head_dim"])
        w.add_uint32(a + "attention.value_length", cfg["head_dim"])
    else:
        _deepseek2_meta(w, a, cfg)
    _gguf_tokenizer_meta(w, cfg["model_type"])

    def name(t, i=None):
        return gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"

    def put(n, arr):
        w.add_tensor(n, np.ascontiguousarray(arr.astype(np.float32)))

    put(name(T.TOKEN_EMBD), sd["embed_tokens.weight"])
    put(name(T.OUTPUT_NORM), sd["norm.weight"])
    put(name(T.OUTPUT), sd["lm_head.weight"])
    for i in range(L):
        for ours, arr in sd.items():
            if ours.startswith(f"layers.{i}."):
                for n, part in _family_gguf_names(ours.removeprefix(f"layers.{i}."), arr, i, cfg, split_kv_b):
                    put(n, part)
        if f"layers.{i}.mlp.experts.0.gate_proj.weight" in sd:  # experts as [E, F, C] / [E, C, F]
            E = cfg["n_routed_experts"]
            for t, proj in ((T.FFN_GATE_EXP, "gate_proj"), (T.FFN_UP_EXP, "up_proj"), (T.FFN_DOWN_EXP, "down_proj")):
                put(name(t, i), np.stack([sd[f"layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(E)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _deepseek2_meta(w, a: str, cfg: dict) -> None:
    rope = cfg["rope_parameters"]
    for key, value in (("leading_dense_block_count", cfg["first_k_dense_replace"]),
                       ("expert_feed_forward_length", cfg["moe_intermediate_size"]),
                       ("expert_count", cfg["n_routed_experts"]), ("expert_used_count", cfg["num_experts_per_tok"]),
                       ("expert_shared_count", cfg["n_shared_experts"]), ("expert_gating_func", 1),
                       ("attention.kv_lora_rank", cfg["kv_lora_rank"]),
                       ("attention.key_length", cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]),
                       ("attention.value_length", cfg["v_head_dim"]), ("rope.dimension_count", cfg["qk_rope_head_dim"]),
                       ("rope.scaling.original_context_length", rope["original_max_position_embeddings"])):
        w.add_uint32(a + key, value)
    if cfg.get("q_lora_rank"):
        w.add_uint32(a + "attention.q_lora_rank", cfg["q_lora_rank"])
    w.add_float32(a + "expert_weights_scale", cfg["routed_scaling_factor"])
    w.add_bool(a + "expert_weights_norm", bool(cfg["norm_topk_prob"]))
    w.add_string(a + "rope.scaling.type", "yarn")
    w.add_float32(a + "rope.scaling.factor", rope["factor"])
    w.add_float32(a + "rope.scaling.yarn_log_multiplier", 0.1 * rope["mscale_all_dim"])


def _family_gguf_names(ours: str, arr: np.ndarray, i: int, cfg: dict, split_kv_b: bool):
    """(GGUF name, array) pairs for one layer tensor of an HF folder (experts are written apart)."""
    import gguf
    from gguf import MODEL_TENSOR as T

    table = {
        "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM,
        "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
        "self_attn.o_proj": T.ATTN_OUT, "self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM,
        "self_attn.q_a_proj": T.ATTN_Q_A, "self_attn.q_a_layernorm": T.ATTN_Q_A_NORM, "self_attn.q_b_proj": T.ATTN_Q_B,
        "self_attn.kv_a_proj_with_mqa": T.ATTN_KV_A_MQA, "self_attn.kv_a_layernorm": T.ATTN_KV_A_NORM,
        "self_attn.kv_b_proj": T.ATTN_KV_B, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
        "mlp.down_proj": T.FFN_DOWN, "mlp.gate": T.FFN_GATE_INP, "mlp.shared_experts.gate_proj": T.FFN_GATE_SHEXP,
        "mlp.shared_experts.up_proj": T.FFN_UP_SHEXP, "mlp.shared_experts.down_proj": T.FFN_DOWN_SHEXP,
    }
    module, _, leaf = ours.rpartition(".")
    if module.startswith("mlp.experts."):
        return []
    if module == "self_attn.kv_b_proj" and split_kv_b:
        H, dn, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        kv = arr.reshape(H, dn + dv, -1)
        fmt = gguf.TENSOR_NAMES
        return [(fmt[T.ATTN_K_B].format(bid=i) + ".weight", kv[:, :dn].transpose(0, 2, 1)),
                (fmt[T.ATTN_V_B].format(bid=i) + ".weight", kv[:, dn:])]
    return [(gguf.TENSOR_NAMES[table[module]].format(bid=i) + "." + leaf, arr)]


# -- Gemma 2 / Gemma 3 (text) ------------------------------------------------------------------

# odd sizes: 3 and 5 query heads on one key/value head, head_dim 16 not hidden / heads; a window of 8
# (prompts are longer) on a mix of sliding and global layers; a score scale other than head_dim's,
# soft caps small enough to bend (Gemma 2), linear RoPE scaling on Gemma 3's global layers only
GEMMA = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=80, intermediate_size=96, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=1,
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=3,
        max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


def write_gemma_model(folder: Path, family: str, seed: int = 0, std: float = 0.08, **over) -> Path:
    """A random Gemma2ForCausalLM / Gemma3ForCausalLM (`family` a key of GEMMA) saved by transformers,
    tied as Gemma is, with the small tokenizer. Norm weights (Gemma scales by 1 + w) scatter around 0;
    the special tokens' rows are zero so that greedy decoding never stops early."""
    import transformers

    cfg_name, model_name, kw = GEMMA[family]
    tok = small_tokenizer()
    cfg = getattr(transformers, cfg_name)(vocab_size=tok.get_vocab_size(), bos_token_id=None,
                                          eos_token_id=tok.token_to_id("<|im_end|>"),
                                          pad_token_id=tok.token_to_id("<|endoftext|>"), **{**kw, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std if p.dim() >= 2 else 0.2)
        for s in SPECIALS:
            model.get_input_embeddings().weight[tok.token_to_id(s)] = 0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder, "mistral")
    return folder


def gemma_spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of exactly `n` pieces, as Gemma's GGUF files hold one: <pad>,
    <eos>, <bos>, <unk>, the 256 byte pieces <0xAB>, then the corpus's characters and every prefix
    of its words (U+2581 for the space), higher scores first. (tokens, scores, token types)"""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    text = _CORPUS.replace(" ", "\u2581")
    pieces = sorted(set(text))
    for word in _CORPUS.split():
        w = "\u2581" + word
        pieces += [w[:k] for k in range(2, len(w) + 1)]
    seen = set(tokens)
    for p in pieces:
        if len(tokens) == n:
            break
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(1)
    assert len(tokens) == n, f"the corpus spells {len(tokens)} pieces, fewer than {n}"
    return tokens, [0.0] * 260 + [-float(i) for i in range(n - 260)], types


def write_gemma_gguf(folder: Path, out: Path) -> Path:
    """A gemma2 / gemma3 GGUF file of a write_gemma_model folder in llama.cpp's layout (F32): norm
    weights with the 1 added as llama.cpp's converter stores them, no output.weight (tied), the
    window and its layer pattern, soft caps and linear RoPE scaling as metadata, and a
    SentencePiece-style vocabulary (gemma_spm_vocab) in place of the folder's byte-level one."""
    import gguf
    from gguf import MODEL_TENSOR as T
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    sd = {k.removeprefix("model."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    a = arch + "."
    for key, value in (("block_count", cfg["num_hidden_layers"]), ("context_length", cfg["max_position_embeddings"]),
                       ("embedding_length", cfg["hidden_size"]), ("feed_forward_length", cfg["intermediate_size"]),
                       ("attention.head_count", cfg["num_attention_heads"]),
                       ("attention.head_count_kv", cfg["num_key_value_heads"]),
                       ("attention.key_length", cfg["head_dim"]), ("attention.value_length", cfg["head_dim"]),
                       ("attention.sliding_window", cfg["sliding_window"])):
        w.add_uint32(a + key, value)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"].get("full_attention", cfg["rope_parameters"])
    w.add_float32(a + "rope.freq_base", rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_string(a + "rope.scaling.type", "linear")
        w.add_float32(a + "rope.scaling.factor", rope["factor"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key):
            w.add_float32(a + key, cfg[key])
    if arch == "gemma3":
        w.add_uint32(a + "attention.sliding_window_pattern", cfg["sliding_window_pattern"])
    tokens, scores, types = gemma_spm_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, value in (("bos_token_id", 2), ("eos_token_id", 1), ("unknown_token_id", 3), ("padding_token_id", 0)):
        w.add_uint32("tokenizer.ggml." + key, value)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    table = {"input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.ATTN_POST_NORM,
             "pre_feedforward_layernorm": T.FFN_PRE_NORM, "post_feedforward_layernorm": T.FFN_POST_NORM,
             "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
             "self_attn.o_proj": T.ATTN_OUT, "self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM,
             "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN}

    def put(name, arr):
        arr = arr + 1 if name.endswith("norm.weight") else arr  # llama.cpp's converter adds Gemma's 1
        w.add_tensor(name, np.ascontiguousarray(arr.astype(np.float32)))

    put(gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", sd["embed_tokens.weight"])
    put(gguf.TENSOR_NAMES[T.OUTPUT_NORM] + ".weight", sd["norm.weight"])
    for name, arr in sd.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, _, leaf = rest.rpartition(".")
            put(gguf.TENSOR_NAMES[table[module]].format(bid=int(i)) + "." + leaf, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out

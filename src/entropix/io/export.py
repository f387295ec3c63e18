"""Any checkpoint entropix reads, written as a Hugging Face folder (for transformers, vLLM, ...).

Tensors are written one at a time, as transformers names them, into safetensors files (sharded
above a size limit), in one dtype: the checkpoint's own float type by default, float32 for
quantized GGUF blocks (dequantized). The folder is built beside its destination and renamed into
place at the end: a failed export leaves nothing half-written, and nothing already there is
replaced unless asked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import EntropixError
from .checkpoint import Checkpoint, HostTensor
from .hf_meta import hf_config, target_config, write_json, write_tokenizer

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
            "half": "float16"}
_ST_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ITEM = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_SHARD_BYTES = 2_000_000_000  # transformers' own default shard size is of this order


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    folder: Path
    dtype: str
    tensors: int
    nbytes: int  # of the weights
    files: int  # safetensors files
    seconds: float


@dataclass(frozen=True)
class _Planned:
    name: str  # transformers' name
    shape: tuple[int, ...]
    read: Callable[[], HostTensor]


def check_dtype(dtype: str | None) -> str | None:
    """float32 / bfloat16 / float16 (or an alias); None or "auto" for the checkpoint's own."""
    if dtype is None or dtype == "auto":
        return None
    name = _ALIASES.get(dtype.lower(), dtype.lower())
    if name not in EXPORT_DTYPES:
        raise EntropixError(f"unsupported export dtype {dtype!r} (choose {', '.join(EXPORT_DTYPES)} or auto)")
    return name


def parse_size(text: str) -> int:
    """"2GB", "500MB", "1.5GiB" or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    digits = s.rstrip("KMGTIB")
    try:
        n = float(digits) * units[s[len(digits):].strip()]
    except (ValueError, KeyError):
        raise EntropixError(f"cannot read the size {text!r} (say e.g. 2GB, 500MB or a number of bytes)") from None
    if n < 1:
        raise EntropixError(f"a shard size must be positive, got {text!r}")
    return int(n)


def convert(t: HostTensor, dtype: str) -> np.ndarray:
    """`t` as the raw little-endian values of `dtype` (bfloat16 as uint16 bits)."""
    a = t.array
    if t.dtype == dtype:
        return np.ascontiguousarray(a)
    f32 = (a.astype(np.uint32) << 16).view(np.float32) if t.dtype == "bfloat16" else a.astype(np.float32)
    if dtype == "float32":
        return f32
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = f32.astype(np.float16)
        if np.isinf(out).sum() != np.isinf(f32).sum():
            raise EntropixError("the weights hold values beyond float16's range (65504): export as bfloat16 or float32")
        return out
    bits = f32.view(np.uint32)  # round to nearest even; NaNs stay NaN
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f32), np.uint16(0x7FC0), rounded)


def _expert_parts(ckpt: Checkpoint, name: str) -> list[_Planned]:
    """A stack of experts ([E, 2F, C] gate_up or [E, C, F] down) as DeepSeek's per-expert
    matrices; the stack is read once for all of them."""
    prefix = "model." + name.rsplit(".", 1)[0]
    shape = ckpt.shape(name)
    held: dict[str, HostTensor] = {}

    def stack() -> HostTensor:
        if name not in held:
            held.clear()
            held[name] = ckpt.read(name)
        return held[name]

    def part(e: int, lo: int, hi: int) -> Callable[[], HostTensor]:
        return lambda: HostTensor(np.ascontiguousarray(stack().array[e, lo:hi]), stack().dtype)

    out = []
    for e in range(shape[0]):
        if name.endswith("gate_up_proj"):
            f = shape[1] // 2
            out.append(_Planned(f"{prefix}.{e}.gate_proj.weight", (f, shape[2]), part(e, 0, f)))
            out.append(_Planned(f"{prefix}.{e}.up_proj.weight", (f, shape[2]), part(e, f, 2 * f)))
        else:
            out.append(_Planned(f"{prefix}.{e}.down_proj.weight", tuple(shape[1:]), part(e, 0, shape[1])))
    return out


def plan_tensors(ckpt: Checkpoint) -> list[_Planned]:
    """Every tensor to write, named as transformers names it."""
    out: list[_Planned] = []
    for name in ckpt.names():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            out += _expert_parts(ckpt, name)
            continue
        if name == "lm_head.weight" and ckpt.config.tie_word_embeddings:
            continue
        hf = name if name == "lm_head.weight" else "model." + name
        out.append(_Planned(hf, tuple(ckpt.shape(name)), _reader(ckpt, name)))
    return out


def _reader(ckpt: Checkpoint, name: str) -> Callable[[], HostTensor]:
    return lambda: ckpt.read(name)


def _shards(plan: list[_Planned], dtype: str, limit: int) -> list[list[_Planned]]:
    """Tensors in order, a new shard whenever the next one would pass `limit` bytes."""
    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in plan:
        n = math.prod(p.shape) * _ITEM[dtype]
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    return shards


def _write_safetensors(path: Path, tensors: list[_Planned], dtype: str) -> int:
    """One safetensors file, each tensor read and written in turn; returns its data's size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in tensors:
        n = math.prod(p.shape) * _ITEM[dtype]
        header[p.name] = {"dtype": _ST_NAMES[dtype], "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for p in tensors:
            arr = convert(p.read(), dtype)
            if arr.shape != p.shape:
                raise EntropixError(f"{p.name}: read {arr.shape}, expected {p.shape}")
            f.write(np.ascontiguousarray(arr).data)
    return offset


def write_weights(folder: Path, plan: list[_Planned], dtype: str, shard_bytes: int) -> tuple[int, int]:
    """model.safetensors, or shards and their index; returns (bytes, files)."""
    shards = _shards(plan, dtype, shard_bytes)
    if len(shards) == 1:
        return _write_safetensors(folder / "model.safetensors", shards[0], dtype), 1
    total, weight_map = 0, {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(folder / name, tensors, dtype)
        weight_map.update({p.name: name for p in tensors})
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total, len(shards)


def check_destination(out: Path, force: bool) -> None:
    """A folder that may be written: absent, empty, or (with force) to be replaced."""
    if out.exists() and not out.is_dir():
        raise EntropixError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EntropixError(f"{out} is not empty: choose another folder, or pass --force to replace it")


def _check_room(parent: Path, nbytes: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < nbytes * 1.02 + (64 << 20):
        raise EntropixError(f"not enough disk space in {parent}: the export needs about {nbytes / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB are free")


def _fill(ckpt: Checkpoint, folder: Path, dtype: str, shard_bytes: int) -> tuple[int, int, int]:
    """Everything into `folder`; returns (tensors, bytes, files)."""
    cfg = target_config(ckpt)
    tok = ckpt.tokenizer  # a vocabulary that cannot be written fails before the weights
    base = None
    if Path(ckpt.source).is_dir():
        base = json.loads((Path(ckpt.source) / "config.json").read_text())
    config = hf_config(cfg, dtype, tok, base)
    plan = plan_tensors(ckpt)
    _check_room(folder.parent, sum(math.prod(p.shape) for p in plan) * _ITEM[dtype])
    write_tokenizer(ckpt, tok, folder, cfg.max_position_embeddings)
    write_json(folder / "config.json", config)
    nbytes, files = write_weights(folder, plan, dtype, shard_bytes)
    return len(plan), nbytes, files


def export(ckpt: Checkpoint, out: Path, dtype: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
           force: bool = False) -> Exported:
    """Write `ckpt` as a Hugging Face folder at `out` (built beside it, then renamed into place)."""
    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    dtype = check_dtype(dtype) or ckpt.native_dtype
    if ckpt.torch_files:
        raise EntropixError(f"{ckpt.source} holds pytorch_model*.bin weights: export reads safetensors and GGUF files")
    check_destination(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = out.with_name(f".{out.name}.export-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    except OSError as e:
        raise EntropixError(f"cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        tensors, nbytes, files = _fill(ckpt, work, dtype, shard_bytes)
        _swap(work, out)
    except OSError as e:
        raise EntropixError(f"writing {out} failed: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Exported(out, dtype, tensors, nbytes, files, time.perf_counter() - t0)


def _swap(work: Path, out: Path) -> None:
    """`work` becomes `out`; a folder already at `out` (replaced under --force) goes only once the new one is in place."""
    if not out.exists():
        work.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        work.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)

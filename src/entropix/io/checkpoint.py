"""Framework-free checkpoints: a GGUF file or a Hugging Face folder, read tensor by tensor.

Tensors are named as in Hugging Face checkpoints, without the "model." prefix
(`embed_tokens.weight`, `layers.3.self_attn.q_proj.weight`, `lm_head.weight`, ...), and come
back as numpy arrays in their stored dtype. Nothing is memory-mapped: touched pages of a map
count in the process's RSS, so a loader that converts one tensor at a time would peak at the
file size plus the model. Each read goes into a fresh buffer that the caller owns (plain
`readinto`; large buffers on anonymous pages, see `_fresh_buffer`).
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import EntropixError
from ..config import ModelConfig
from . import gguf
from .layouts import Derived, gguf_derived, gguf_layer_names, hf_expert_stacks, language_model_part
from .tokenizer import FAMILY_TEMPLATES, TextTokenizer

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class HostTensor:
    """A tensor on the host: float32 / float16 arrays as they are; bfloat16 as its raw
    bits in an np.uint16 array (numpy has no bfloat16)."""

    array: np.ndarray
    dtype: str  # "float32" | "float16" | "bfloat16"


_PAGES_FROM = 1 << 20  # buffers this large get pages of their own


def _fresh_buffer(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array. Large ones sit on anonymous pages (no file behind
    them) that go back to the OS as soon as the array is freed: malloc'd blocks of these
    sizes stay in the heap after a loader frees them (say, fusing q/k/v) and the heap then
    grows beside them, which cost ~10% of a bf16 model's size in peak RSS."""
    if nbytes < _PAGES_FROM:
        return np.empty(nbytes, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def _read_bytes(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes of a file from `offset`, read into a fresh uint8 array."""
    out = _fresh_buffer(nbytes)
    view, got = memoryview(out), 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            while got < nbytes:  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    raise EntropixError(f"{path} is truncated (a tensor ends past the end of the file)")
                got += n
    except OSError as e:
        raise EntropixError(f"cannot read {path}: {e.strerror or e}") from None
    return out


def _slice(t: HostTensor, dim: int, start: int, stop: int) -> HostTensor:
    index = (slice(None),) * dim + (slice(start, stop),)
    return HostTensor(np.ascontiguousarray(t.array[index]), t.dtype)


class Checkpoint:
    """A model's config, tokenizer and tensors, read lazily from where they are stored."""

    config: ModelConfig
    name: str  # what profiles and the server call the model
    source: str  # the file or folder
    native_dtype: str  # the dtype the weights are stored in ("float32" for quantized GGUF)
    rope_freq_factors: np.ndarray | None = None  # GGUF's Llama-3 RoPE scaling, as divisors
    torch_files: tuple[Path, ...] = ()  # pytorch_model*.bin: only a torch loader can read them
    _derived: Derived = {}  # tensors built from stored ones (stacked experts): name -> (shape, read)

    _tokenizer: TextTokenizer | None = None

    def _build_tokenizer(self) -> TextTokenizer:
        raise NotImplementedError

    @property
    def tokenizer(self) -> TextTokenizer:
        """Built on first use: tensor-parallel ranks read weights only, and parsing a 49k-token
        vocabulary costs about half a second per open."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    def _read_derived(self, name: str) -> HostTensor:
        arr, dtype = self._derived[name][1]()
        return HostTensor(arr, dtype)

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> HostTensor:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> HostTensor:
        """Rows / columns [start, stop) of dimension `dim` (for tensor parallelism)."""
        dim = self._check_slice(name, dim, start, stop)
        return _slice(self.read(name), dim, start, stop)

    def stored_bits(self, name: str) -> int | None:
        """4 or 8 where `name` is stored in blocks the CPU kernels take (Q4_0/Q4_1/Q4_K, Q8_0),
        None for anything else (plain floats, other block types)."""
        return None

    def read_int4(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A 4-bit-block matrix as its groups of 32 (q, d, m; see gguf.int4_groups), or None."""
        return None

    def _check_slice(self, name: str, dim: int, start: int, stop: int) -> int:
        shape = self.shape(name)
        if not -len(shape) <= dim < len(shape):
            raise EntropixError(f"{name} has {len(shape)} dimensions: cannot slice dimension {dim}")
        dim %= len(shape)
        if not 0 <= start <= stop <= shape[dim]:
            raise EntropixError(f"slice [{start}, {stop}) is outside dimension {dim} of {name} (size {shape[dim]})")
        return dim

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.source!r}, {self.native_dtype})"


def open_path(path: Path) -> Checkpoint:
    """The checkpoint at `path`: a .gguf file or a Hugging Face folder."""
    path = Path(path)
    if path.is_dir():
        return HFCheckpoint(path)
    if not path.exists():
        raise EntropixError(f"no such model file or folder: {path}")
    if path.suffix.lower() != ".gguf":
        raise EntropixError(f"{path} is not a .gguf file or a model folder")
    return GGUFCheckpoint(path)


# -- GGUF -------------------------------------------------------------------------------

_GGUF_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
# per-layer names (and llama.cpp's Q/K row permutation) live in layouts.gguf_layer_names


def _gguf_native_dtype(tensors: dict[str, gguf.GGUFTensor]) -> str:
    """float16 / bfloat16 when every matrix is stored so; float32 for anything quantized."""
    kinds = {t.qtype for t in tensors.values() if len(t.shape) == 2}
    return {frozenset({gguf.F16}): "float16", frozenset({gguf.BF16}): "bfloat16"}.get(frozenset(kinds), "float32")


class GGUFCheckpoint(Checkpoint):
    """A GGUF file of a supported architecture; Q/K rows come back in Hugging Face's order."""

    def __init__(self, path: Path) -> None:
        meta, self._tensors, mm = gguf.read_gguf(path)
        del mm  # reads go through _read_bytes, not the map
        self._path = path
        if "token_embd.weight" not in self._tensors:
            raise EntropixError(f"{path} holds no llama token embedding (token_embd.weight)")
        n_vocab = int(self._tensors["token_embd.weight"].shape[-1])
        tied = "output.weight" not in self._tensors  # GGUF files omit a tied output
        self.config = ModelConfig.from_gguf(meta, n_vocab).replace(tie_word_embeddings=tied)
        if "blk.0.attn_q.bias" in self._tensors:  # Qwen2: biases on q, k, v
            self.config = self.config.replace(qkv_bias=True)
        self._meta = meta
        # a name that survives renaming the file: profiles are chosen by it
        parts = [str(meta[k]) for k in ("general.basename", "general.size_label") if meta.get(k)]
        self.name = "-".join(parts).lower() if parts else path.stem
        self.source = str(path)
        self.native_dtype = _gguf_native_dtype(self._tensors)
        if "rope_freqs.weight" in self._tensors:
            freqs, _ = self._decode("rope_freqs.weight")
            self.rope_freq_factors = freqs.astype(np.float32)
        # our name -> (the file's name, heads to un-permute by, if any)
        self._map: dict[str, tuple[str, int | None]] = {k: (v, None) for k, v in _GGUF_GLOBAL.items()}
        for i in range(self.config.num_hidden_layers):
            for ours, (theirs, heads) in gguf_layer_names(self.config, self.config.arch, i).items():
                self._map[f"layers.{i}.{ours}"] = (theirs, heads)
        self._derived = gguf_derived(self.config, self._tensors, self._decode)

    def _build_tokenizer(self) -> TextTokenizer:
        try:
            tok = TextTokenizer.from_gguf_metadata(self._meta)
        except (ValueError, KeyError) as e:
            raise EntropixError(f"{self._path}: cannot build its tokenizer ({e})") from None
        tok.fallback_template = FAMILY_TEMPLATES.get(self.config.arch, tok.fallback_template)
        return tok

    def _decode(self, gguf_name: str) -> tuple[np.ndarray, str]:
        if gguf_name not in self._tensors:
            raise EntropixError(f"{self._path} lacks the tensor {gguf_name}")
        t = self._tensors[gguf_name]
        return gguf.decode_tensor(self._path, t, _read_bytes(self._path, t.offset, t.nbytes))

    def names(self) -> list[str]:
        return [ours for ours, (theirs, _) in self._map.items() if theirs in self._tensors] + list(self._derived)

    def _lookup(self, name: str) -> tuple[str, int | None]:
        if name not in self._map:
            raise EntropixError(f"{self._path} has no tensor {name}")
        return self._map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._derived:
            return self._derived[name][0]
        theirs, _ = self._lookup(name)
        if theirs not in self._tensors:
            raise EntropixError(f"{self._path} lacks the tensor {theirs}")
        return self._tensors[theirs].array_shape

    def read(self, name: str) -> HostTensor:
        if name in self._derived:
            return self._read_derived(name)
        theirs, n_heads = self._lookup(name)
        arr, dtype = self._decode(theirs)
        if n_heads is not None:
            arr = gguf.unpermute(arr, n_heads)
        return HostTensor(arr, dtype)

    def _stored(self, name: str) -> tuple[gguf.GGUFTensor | None, int | None]:
        if name in self._derived:
            return None, None
        theirs, n_heads = self._lookup(name)
        return self._tensors.get(theirs), n_heads

    def stored_bits(self, name: str) -> int | None:
        t, _ = self._stored(name)
        if t is None or len(t.shape) != 2:
            return None
        return 4 if t.qtype in gguf.INT4_TYPES else 8 if t.qtype == gguf.Q8_0 else None

    def read_int4(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Rows in Hugging Face's order; None when `name` is not stored in 4-bit blocks."""
        t, n_heads = self._stored(name)
        if t is None or self.stored_bits(name) != 4:
            return None
        parts = gguf.int4_groups(t, _read_bytes(self._path, t.offset, t.nbytes))
        if n_heads is not None:  # the permutation moves whole rows: the same on each part
            parts = tuple(gguf.unpermute(a, n_heads) for a in parts)
        return parts

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> HostTensor:
        """Rows of a matrix are contiguous (whole quantization blocks): only their bytes are read.
        Q/K rows are un-permuted per head, so their slices must hold whole heads to be read alone."""
        dim = self._check_slice(name, dim, start, stop)
        if name in self._derived:  # built from several stored tensors: read, then sliced
            return super().read_slice(name, dim, start, stop)
        theirs, n_heads = self._lookup(name)
        t = self._tensors[theirs]
        rows = t.array_shape[0]
        per_head = rows // n_heads if n_heads else 1
        if dim != 0 or len(t.shape) != 2 or start % per_head or stop % per_head:
            return super().read_slice(name, dim, start, stop)
        row = t.nbytes // rows
        part = gguf.GGUFTensor(t.name, (t.shape[0], stop - start), t.qtype, t.offset + start * row, (stop - start) * row)
        arr, dtype = gguf.decode_tensor(self._path, part, _read_bytes(self._path, part.offset, part.nbytes))
        if n_heads:
            arr = gguf.unpermute(arr, (stop - start) // per_head)
        return HostTensor(arr, dtype)


# -- Hugging Face folders -----------------------------------------------------------------

# safetensors dtype -> (numpy dtype of the bits, our name); the rest only have their sizes,
# so that a header can be checked before we refuse to read those tensors.
_ST_READ = {"F32": ("<f4", "float32"), "F16": ("<f2", "float16"), "BF16": ("<u2", "bfloat16")}
_ST_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
            "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


@dataclass(frozen=True)
class _Stored:
    file: Path
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def _header_json(path: Path) -> tuple[dict, int, int]:
    """(header dict, where the data starts, file size) of a safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise EntropixError(f"{path}: corrupt or truncated safetensors header")
            raw = f.read(n)
    except OSError as e:
        raise EntropixError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EntropixError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise EntropixError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n, size


def _read_header(path: Path) -> dict[str, _Stored]:
    """The tensors of one safetensors file, checked against the file's size."""
    header, base, size = _header_json(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise EntropixError(f"{path}: corrupt safetensors header (entry {name!r})") from None
        if not 0 <= begin <= end or (dtype in _ST_SIZE and end - begin != math.prod(shape) * _ST_SIZE[dtype]):
            raise EntropixError(f"{path}: corrupt safetensors header (offsets of {name!r})")
        if base + end > size:
            raise EntropixError(f"{path} is truncated: tensor {name} ends past the end of the file")
        out[name] = _Stored(path, dtype, shape, base + begin, end - begin)
    return out


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EntropixError(f"corrupt {index}: {e}") from None
        for name in names:
            if not (folder / name).is_file():
                raise EntropixError(f"missing weight shard {folder / name}")
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def _folder_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EntropixError(f"{folder} has no config.json")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as e:
        raise EntropixError(f"corrupt {cfg_path}: {e}") from None


class HFCheckpoint(Checkpoint):
    """A Hugging Face folder: config.json, a tokenizer, safetensors (sharded or not).

    Only the headers are read when it opens; each tensor is read when asked for.
    """

    def __init__(self, folder: Path) -> None:
        raw = _folder_config(folder)
        cfg = ModelConfig.from_hf(raw)
        self.name, self.source, self._folder = folder.name, str(folder), folder
        self._stored: dict[str, _Stored] = {}
        for f in _shard_files(folder):
            self._stored.update({k.removeprefix("model."): v for k, v in _read_header(f).items()})
        if raw.get("model_type") == "gemma3":  # image-text folder: its text model only
            self._stored = language_model_part(self._stored)
        if not self._stored:
            self.torch_files = tuple(sorted(folder.glob("pytorch_model*.bin")))
            if not self.torch_files:
                raise EntropixError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
            stated = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
            self.native_dtype = stated if stated in DTYPES else "float32"
        else:
            embed = self._stored.get("embed_tokens.weight")
            self.native_dtype = _ST_READ.get(embed.dtype, ("", "float32"))[1] if embed else "float32"
            if "lm_head.weight" not in self._stored and not cfg.tie_word_embeddings:
                cfg = cfg.replace(tie_word_embeddings=True)  # no lm_head stored: it is tied
        self.config = cfg
        self._derived, self._replaced = hf_expert_stacks(
            cfg, self._stored, lambda n: self._stored[n].shape, lambda n: self._read_stored(n))

    def _build_tokenizer(self) -> TextTokenizer:
        try:
            tok = TextTokenizer.from_dir(self._folder)
        except ValueError as e:
            raise EntropixError(str(e)) from None
        tok.fallback_template = FAMILY_TEMPLATES.get(self.config.arch, tok.fallback_template)
        return tok

    def names(self) -> list[str]:
        tied = self.config.tie_word_embeddings
        stored = [n for n in self._stored if not (tied and n == "lm_head.weight") and n not in self._replaced]
        return stored + list(self._derived)

    def _entry(self, name: str) -> _Stored:
        if name not in self._stored:
            if self.torch_files:
                raise EntropixError(f"{self._folder} holds pytorch_model*.bin weights, which only the torch backend reads")
            raise EntropixError(f"{self._folder}: weights lack {name}")
        e = self._stored[name]
        if e.dtype not in _ST_READ:
            raise EntropixError(f"{e.file}: tensor {name} is stored as {e.dtype}; entropix reads F32, F16 and BF16")
        return e

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._derived:
            return self._derived[name][0]
        return self._entry(name).shape

    def read(self, name: str) -> HostTensor:
        if name in self._derived:
            return self._read_derived(name)
        e = self._entry(name)
        np_dtype, dtype = _ST_READ[e.dtype]
        return HostTensor(_read_bytes(e.file, e.offset, e.nbytes).view(np_dtype).reshape(e.shape), dtype)

    def _read_stored(self, name: str) -> tuple[np.ndarray, str]:
        t = self.read(name)
        return t.array, t.dtype

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> HostTensor:
        """Rows of dimension 0 are contiguous: only their bytes are read. Other dimensions
        are read whole, then sliced."""
        dim = self._check_slice(name, dim, start, stop)
        if name in self._derived:
            return _slice(self.read(name), dim, start, stop)
        e = self._entry(name)
        if dim == 1 and len(e.shape) == 2:
            return self._columns(e, start, stop)
        if dim != 0:
            return _slice(self.read(name), dim, start, stop)
        np_dtype, dtype = _ST_READ[e.dtype]
        row = e.nbytes // e.shape[0] if e.shape[0] else 0
        raw = _read_bytes(e.file, e.offset + start * row, (stop - start) * row)
        return HostTensor(raw.view(np_dtype).reshape((stop - start, *e.shape[1:])), dtype)

    def _columns(self, e: _Stored, start: int, stop: int) -> HostTensor:
        """Columns [start, stop) of a matrix, read in blocks of rows: never the whole tensor at once."""
        np_dtype, dtype = _ST_READ[e.dtype]
        rows, cols = e.shape
        row = e.nbytes // rows if rows else 0
        item = np.dtype(np_dtype).itemsize
        out = _fresh_buffer(rows * (stop - start) * item).view(np_dtype).reshape(rows, stop - start)
        step = max(1, (16 << 20) // max(row, 1))  # 16 MB of rows per read
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            out[r0:r0 + n] = _read_bytes(e.file, e.offset + r0 * row, n * row).view(np_dtype).reshape(n, cols)[:, start:stop]
        return HostTensor(out, dtype)

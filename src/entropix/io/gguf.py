"""GGUF files: metadata and tensor table (our own reader), tensor decoding (the `gguf` package).

Numpy only. Our reader, because the `gguf` package's builds a numpy view per vocabulary
string, which takes seconds for a 49k-token vocabulary; dequantization is the package's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import EntropixError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# Tensor types kept as stored (numpy dtype, our dtype name); bf16 travels as its raw bits.
F32, F16, BF16 = 0, 1, 30
_PLAIN = {F32: ("<f4", "float32"), F16: ("<f2", "float16"), BF16: ("<u2", "bfloat16")}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    qtype: int
    offset: int  # absolute, in the file
    nbytes: int = 0

    @property
    def array_shape(self) -> tuple[int, ...]:
        """numpy order (outermost first): (rows, cols) for a matrix."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Reads GGUF's little-endian values from a buffer, failing with one line when it ends early."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise EntropixError(f"{self.path} is truncated (metadata ends early)")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        (val,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return val

    def string(self) -> str:
        n = self.take("<Q")
        self._need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype == _STRING:
                return [self.string() for _ in range(count)]
            if itype in _NP:  # numbers in one go: vocabularies hold 100k+ of them
                self._need(count * np.dtype(_NP[itype]).itemsize)
                arr = np.frombuffer(self.buf, dtype=_NP[itype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise EntropixError(f"{self.path}: unknown GGUF value type {vtype} (corrupt file?)")
        return self.take(_SCALARS[vtype])


def _read_tables(cur: _Cursor) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]]]:
    """The key/value metadata and the raw tensor infos (name, dims, type, relative offset)."""
    path = cur.path
    if len(cur.buf) < 24 or bytes(cur.buf[:4]) != b"GGUF":
        raise EntropixError(f"{path} is not a GGUF file")
    cur.pos = 4
    version = cur.take("<I")
    if version < 2:
        raise EntropixError(f"{path}: GGUF version {version} is too old (need 2 or newer)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    meta: dict = {}
    infos = []
    try:
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.take("<I"))
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
            infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    except (struct.error, ValueError, MemoryError) as e:
        raise EntropixError(f"{path}: corrupt GGUF metadata ({e})") from None
    return meta, infos


def _tensor_bytes(path: Path, name: str, dims: tuple[int, ...], qtype: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise EntropixError(f"{path}: tensor {name} has unknown type {qtype}") from None
    return int(np.prod(dims)) // block * size


def read_gguf(path: Path) -> tuple[dict, dict[str, GGUFTensor], np.memmap]:
    """Parse a GGUF file's metadata and tensor table; the data stays memory-mapped.

    Callers that read tensors one by one should drop the map and use `decode_tensor` on
    bytes they read themselves: touched pages of a map count in the process's RSS.
    """
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise EntropixError(f"cannot read GGUF file {path}: {e}") from None
    cur = _Cursor(memoryview(mm), Path(path))
    meta, infos = _read_tables(cur)
    align = int(meta.get("general.alignment", 32))
    base = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, dims, qtype, off in infos:
        nbytes = _tensor_bytes(path, name, dims, qtype)
        if base + off + nbytes > len(mm):
            raise EntropixError(f"{path} is truncated: tensor {name} ends past the end of the file")
        tensors[name] = GGUFTensor(name, dims, qtype, base + off, nbytes)
    return meta, tensors, mm


def decode_tensor(path: Path, t: GGUFTensor, raw: np.ndarray) -> tuple[np.ndarray, str]:
    """A tensor's stored bytes (uint8, `t.nbytes` of them) as (array in numpy order, dtype name).

    F32, F16 and BF16 keep their type (BF16 as uint16 bits) and share `raw`'s memory;
    quantized types are dequantized to float32.
    """
    if t.qtype in _PLAIN:
        np_dtype, name = _PLAIN[t.qtype]
        return raw.view(np_dtype).reshape(t.array_shape), name
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    try:
        arr = dequantize(raw.reshape(rows, t.shape[0] // block * size), qtype)
    except NotImplementedError:
        raise EntropixError(f"{path}: tensor {t.name} uses {qtype.name}, which the gguf package cannot dequantize") from None
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(t.array_shape), "float32"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> rotate-half)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


Q4_0, Q4_1, Q8_0, Q4_K = 2, 3, 8, 12
INT4_TYPES = (Q4_0, Q4_1, Q4_K)  # 4-bit blocks that are int4 groups of 32 exactly


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 number at byte `at` of every block, as float32."""
    return blocks[..., at:at + 2].copy().view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 weights: low nibbles are weights 0-15, high nibbles 16-31 (Q4_0, Q4_1)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 6-bit (scale, min) of its 8 sub-blocks, each [..., 8]."""
    lo, hi = sc[..., 0:4], sc[..., 4:8]
    rest = sc[..., 8:12]
    scale = np.concatenate([lo & 63, (rest & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([hi & 63, (rest >> 4) | ((hi >> 6) << 4)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def int4_groups(t: GGUFTensor, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0, Q4_1 or Q4_K matrix as groups of 32 without dequantizing: (q uint8 [N, K] in
    0..15, d float32 [N, K/32], m float32 [N, K/32]) with w = d * q + m, which is each format's
    own rule rewritten (Q4_0: m = -8d; Q4_K: d = super-d * scale, m = -super-dmin * min)."""
    if t.qtype not in INT4_TYPES or len(t.shape) != 2:
        raise EntropixError(f"tensor {t.name} is not a 4-bit block matrix (Q4_0, Q4_1, Q4_K)")
    K, N = t.shape
    if t.qtype == Q4_K:
        blocks = raw.reshape(N, K // 256, 144)
        sc, mn = _k_scales(blocks[..., 4:16])
        d = _f16(blocks, 0)[..., None] * sc
        m = -_f16(blocks, 2)[..., None] * mn
        qs = blocks[..., 16:].reshape(N, K // 256, 4, 32)  # 4 chunks of 64 weights: low nibbles first
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(N, K)
        return q, d.reshape(N, K // 32), m.reshape(N, K // 32)
    if t.qtype == Q4_0:
        blocks = raw.reshape(N, K // 32, 18)
        d = _f16(blocks, 0)
        return _nibbles(blocks[..., 2:]).reshape(N, K), d, -8 * d
    blocks = raw.reshape(N, K // 32, 20)
    return _nibbles(blocks[..., 4:]).reshape(N, K), _f16(blocks, 0), _f16(blocks, 2)

"""Wide products over int4 weights: dequantized block by block onto a dense fp32 GEMM.

The int4 CPU kernel dequantizes inside its loop for every row, so its cost grows with the rows
at the full per-row price, while a dense GEMM pays for its weights once. From about 128 rows (a
long prompt's prefill, a prefill chunk, a wide batch) dequantizing the weights into a scratch
buffer and multiplying densely is faster on this repository's CPU: 1.4x at 128 rows, more
beyond (`benchmarks/bench_int4_wide.py` measures it). Below that the kernel stays (decode).

The packed tensor is in PyTorch's own layout for `_weight_int4pack_mm_for_cpu`: for each block
of B output rows, for each input k, B/2 bytes whose low nibbles are the block's first half and
high nibbles its second. B is the CPU's vector: 32 rows on AVX2, 64 on AVX-512. That layout is
private, so the block is found from the packer once, before it is used; a weight whose rows do
not fill whole blocks stays on the kernel.
"""

from __future__ import annotations

import functools
import threading

import torch

WIDE_ROWS = 128  # rows from which the dense path is used
BLOCK = 1 << 21  # weights dequantized at once: the scratch stays near 8 MB of fp32 (+2 MB of codes)
_local = threading.local()  # scratch buffers per thread (a server's scheduler, a test's own)


def _scratch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer: fresh multi-MB allocations each call cost more in page faults than the
    dequantization itself."""
    n = 1
    for d in shape:
        n *= d
    pool = _local.__dict__.setdefault("pool", {})
    buf = pool.get(dtype)
    # one made under inference_mode cannot be written outside it: make a new one there
    if buf is None or buf.numel() < n or (buf.is_inference() and not torch.is_inference_mode_enabled()):
        buf = pool[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def unpack(packed: torch.Tensor, N: int, K: int, rows: int = 0) -> torch.Tensor:
    """The 4-bit codes [N, K] (uint8, 0..15) of a packed weight (N a multiple of the block)."""
    rows = rows or block_rows()
    v = packed.reshape(N // rows, K, rows // 2)
    return torch.cat([v & 15, v >> 4], -1).permute(0, 2, 1).reshape(N, K)


@functools.cache
def block_rows() -> int:
    """The output rows per packed block of this PyTorch on this CPU (32 or 64), found on a random
    matrix; 0 where the packing is neither."""
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except (AttributeError, RuntimeError):
        return 0
    if packed.numel() * 2 != q.numel():
        return 0
    return next((b for b in (32, 64) if torch.equal(unpack(packed, 128, 96, b).to(torch.int32), q)), 0)


def usable(N: int, K: int, group: int) -> bool:
    rows = block_rows()
    return rows > 0 and N % rows == 0 and K % group == 0


def wide_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ W.T in fp32 for W = (q - 8) * scale + zero, read from the kernel's packing
    (`scales_zeros` [K / group, N, 2]); one block of output rows at a time forms one small
    batched GEMM."""
    KG, N, _ = scales_zeros.shape
    B = block_rows()
    K, nb, M = KG * group, N // B, x.shape[0]
    codes = packed.reshape(nb, KG, group, B // 2)
    sz = scales_zeros.float().view(KG, nb, B, 2).permute(1, 0, 2, 3)  # [nb, KG, B, 2]
    scale = sz[..., 0].unsqueeze(2).contiguous()  # [nb, KG, 1, B]
    zero = (sz[..., 1] - 8 * sz[..., 0]).unsqueeze(2).contiguous()
    xf, y = x.float(), torch.empty(M, N)
    step = max(1, BLOCK // (B * K))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        q = _scratch((b1 - b0, KG, group, B), torch.uint8)
        torch.bitwise_and(codes[b0:b1], 15, out=q[..., :B // 2])
        torch.bitwise_right_shift(codes[b0:b1], 4, out=q[..., B // 2:])
        w = torch.addcmul(zero[b0:b1], q, scale[b0:b1], out=_scratch(q.shape, torch.float32))
        part = torch.matmul(xf, w.view(b1 - b0, K, B))  # [blocks, M, B]
        y[:, b0 * B:b1 * B] = part.permute(1, 0, 2).reshape(M, -1)
    return y

"""Wide products over int4 weights: dequantized block by block onto a dense fp32 GEMM.

The int4 CPU kernel dequantizes inside its loop for every row, so its cost grows with the rows
at the full per-row price, while a dense GEMM pays for its weights once. From about 128 rows (a
long prompt's prefill, a prefill chunk, a wide batch) dequantizing the weights into a scratch
buffer and multiplying densely is faster on this repository's CPU: 1.4x at 128 rows, more
beyond (`benchmarks/bench_int4_wide.py` measures it). Below that the kernel stays (decode).

The packed tensor is in PyTorch's own layout for `_weight_int4pack_mm_for_cpu`: for each 32
output rows, for each input k, 16 bytes whose low nibbles are rows 0-15 and high nibbles rows
16-31. That layout is private, so it is checked against the packer once before it is used.
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
    if buf is None or buf.numel() < n:
        buf = pool[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The 4-bit codes [N, K] (uint8, 0..15) of a packed weight (N a multiple of 32)."""
    v = packed.reshape(N // 32, K, 16)
    return torch.cat([v & 15, v >> 4], -1).permute(0, 2, 1).reshape(N, K)


@functools.cache
def layout_known() -> bool:
    """Whether this PyTorch packs as `unpack` reads (checked once on a random matrix)."""
    q = torch.randint(0, 16, (64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except (AttributeError, RuntimeError):
        return False
    return packed.numel() * 2 == q.numel() and torch.equal(unpack(packed, 64, 96).to(torch.int32), q)


def usable(N: int, K: int, group: int) -> bool:
    return N % 32 == 0 and K % group == 0 and layout_known()


def wide_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ W.T in fp32 for W = (q - 8) * scale + zero, read from the kernel's packing
    (`scales_zeros` [K / group, N, 2]); 32 output rows at a time form one small batched GEMM."""
    KG, N, _ = scales_zeros.shape
    K, nb, M = KG * group, N // 32, x.shape[0]
    codes = packed.reshape(nb, KG, group, 16)
    sz = scales_zeros.float().view(KG, nb, 32, 2).permute(1, 0, 2, 3)  # [nb, KG, 32, 2]
    scale = sz[..., 0].unsqueeze(2).contiguous()  # [nb, KG, 1, 32]
    zero = (sz[..., 1] - 8 * sz[..., 0]).unsqueeze(2).contiguous()
    xf, y = x.float(), torch.empty(M, N)
    step = max(1, BLOCK // (32 * K))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        q = _scratch((b1 - b0, KG, group, 32), torch.uint8)
        torch.bitwise_and(codes[b0:b1], 15, out=q[..., :16])
        torch.bitwise_right_shift(codes[b0:b1], 4, out=q[..., 16:])
        w = torch.addcmul(zero[b0:b1], q, scale[b0:b1], out=_scratch(q.shape, torch.float32))
        part = torch.matmul(xf, w.view(b1 - b0, K, 32))  # [blocks, M, 32]
        y[:, b0 * 32:b1 * 32] = part.permute(1, 0, 2).reshape(M, -1)
    return y

"""A decode step with less Python in it: `torch.compile` of each block's dense parts.

At batch 1 a decode step of the embedded model is ~30 layers x ~25 small ops; in a profile of
the int4 step (one thread) about 40% of the time was outside the matmuls. Inductor fuses the
norms, RoPE, SiLU-gating and residual adds into a few kernels around the projections. On the
2-core CI CPU it did not pay (56.0 vs 53.8 ms per int4 step, heavily loaded machine), so it is
opt-in: `compile_decode(model)`, or the `+compile` modes of `entropix bench --modes`. The KV-cache write and attention stay eager: attention
reads the valid slots only ([:S], S = longest row + 1), so its shape changes every step,
while the compiled parts see fixed shapes [B, 1, C] (one graph per batch size; prefill,
T > 1, runs eager).

Where no compiler works (no C++ toolchain, an unsupported platform) the first compiled
call fails: one warning, and the model runs eager from then on.
"""

from __future__ import annotations

import shutil
import sys

import torch
import torch.nn.functional as F

from .layers import MLP, rotate_half
from .model import Attention, Block


def _pre(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Input norm, q/k/v projection and RoPE of one new token per row: q [B, H, 1, D], k, v [B, Hkv, 1, D]."""
    a = block.self_attn
    B, T, _ = x.shape
    H, Hkv, D = a.n_heads, a.n_kv, a.head_dim
    qkv = a.qkv_proj(block.input_layernorm(x)).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
    qk = qkv[:, :H + Hkv]
    if a.qk_norm:
        qk = torch.cat([a.q_norm(qk[:, :H]), a.k_norm(qk[:, H:])], 1)
    qk = qk * cos + rotate_half(qk) * sin
    return qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]


def _post(block: Block, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Output projection, residual, MLP and residual."""
    B, H, T, D = out.shape
    x = x + block.self_attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))
    return x + block.mlp(block.post_attention_layernorm(x))


class _State:
    """The compiled parts, shared by every block (one graph serves them all), and whether
    compiling failed here."""

    def __init__(self, mode: str | None) -> None:
        self.parts = {f: torch.compile(f, dynamic=False, mode=mode) for f in (_pre, _post)}
        self.failed = False

    def call(self, fn, *args):
        if not self.failed:
            try:
                return self.parts[fn](*args)
            except Exception as e:  # no working compiler: say so once, run eager from here on
                self.failed = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"entropix: warning: torch.compile failed ({first[:160]}); decoding eager", file=sys.stderr)
        return fn(*args)


def _eager_forward(block: Block):
    return type(block).forward.__get__(block)


def _forward(block: Block, state: _State, eager):
    def forward(x, cos, sin, cache, layer, mask, capture):
        if x.shape[1] != 1:
            return eager(x, cos, sin, cache, layer, mask, capture)
        a = block.self_attn
        q, k, v = state.call(_pre, block, x, cos, sin)
        cache.write(layer, k, v)
        S = mask.shape[-1]
        keys, values = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=a.n_kv != a.n_heads)
        stats = a.head_stats(q[:, :, -1], keys, mask[:, 0, -1]) if capture else None
        return state.call(_post, block, x, out), stats

    return forward


def compilable(block: Block) -> bool:
    """Plain fused attention and MLP without a sliding window (the others stay eager)."""
    a = block.self_attn
    # type(block) is Block: a Gemma block reuses Attention and MLP between its own norms and scales
    return type(block) is Block and type(a) is Attention and a.qkv_proj is not None and type(block.mlp) is MLP


def compile_decode(model, mode: str | None = None) -> bool:
    """Route the decode step (T == 1) of every compilable block through compiled parts.
    False (and nothing changed, one warning) where torch.compile cannot run here."""
    if shutil.which("c++") is None and shutil.which("g++") is None and model.device.type == "cpu":
        print("entropix: warning: torch.compile needs a C++ compiler on the CPU (none found); decoding eager",
              file=sys.stderr)
        return False
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    state = _State(mode)
    window = model.config.sliding_window
    for i, block in enumerate(model.layers):
        if compilable(block) and not (window and model.config.slides(i)):
            block.forward = _forward(block, state, _eager_forward(block))
    model.compiled_state = state
    return True

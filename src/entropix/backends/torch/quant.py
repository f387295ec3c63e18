"""Weight-only quantized projections on the CPU: int8 per output channel, int4 in groups.

Decode reads every weight once per token, so its speed is set by the bytes of weights.
PyTorch's CPU kernels multiply bf16 activations by int8 rows (`_weight_int8pack_mm`, one
scale per row) or by packed 4-bit groups (`_weight_int4pack_mm_for_cpu`, a scale and a
zero per group of 32/64/128/256 inputs, w = (q - 8) * scale + zero for q in 0..15). With
fp32 activations the same kernels are 3-25x slower (measured on this repo's CI CPU), so a
quantized projection rounds its input to bf16 and gives the kernel's bf16 output.

A llama.cpp Q4_1 block (32 weights, w = d * q + m) is such an int4 group with scale d and
zero m + 8d: `Int4Linear.from_groups` takes the blocks as stored (io.gguf.q4_1_groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import EntropixError

MODES = ("none", "int8", "int4")
CHOICES = ("auto", *MODES)
GROUP = 32  # inputs per int4 group: the size of a Q4_1 block
_COMPUTE = torch.bfloat16


def check_mode(mode: str | None) -> str:
    """The mode name, or a one-line error for an unknown one."""
    mode = "none" if mode is None else str(mode).lower()
    if mode not in CHOICES:
        raise EntropixError(f"unknown --quant {mode!r} (choose from {', '.join(CHOICES)})")
    return mode


def available(mode: str) -> bool:
    """Whether this PyTorch has the CPU kernel for a mode."""
    need = {"int8": ("_weight_int8pack_mm",),
            "int4": ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")}.get(mode, ())
    return all(hasattr(torch, n) for n in need)


class QuantLinear(nn.Module):
    """A bias-optional projection x @ W.T (+ b) with W held quantized; no autograd."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.widen = False
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's bf16 output: the next op promotes it exactly as a cast would (a residual
        add or RoPE with fp32 operands, a cache write, the logits' .float()), so none is spent;
        `widen` casts back where the next op would otherwise compute in bf16 (an MLP's gating,
        which changed greedy text of the embedded model when it did)."""
        x2 = x.reshape(-1, self.in_features)
        y = self._mm(x2 if x2.dtype == _COMPUTE else x2.to(_COMPUTE))
        if self.widen:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y.to(x.dtype) + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] the kernel multiplies by (for parity checks)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """int8 weights, one bf16 scale per output row (symmetric, w = q * scale)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(q.shape[1], q.shape[0], bias)
        self.register_buffer("qweight", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(_COMPUTE).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        w = w.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127)
        return cls(q, scale, bias)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


@dataclass
class Int4Groups:
    """Unpacked int4 weights: q [N, K] in 0..15 and per-group scale, zero [N, K / group]
    with w = (q - 8) * scale + zero. Rows concatenate (fused projections)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    @staticmethod
    def cat(parts: list["Int4Groups"]) -> "Int4Groups":
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")))


def int4_groups(w: torch.Tensor, group: int = GROUP) -> Int4Groups:
    """Asymmetric min/max quantization of each group of `group` inputs (Q4_1's rule, so a
    dequantized Q4_1 tensor comes back to its own blocks)."""
    w = w.detach().float()
    N, K = w.shape
    g = w.view(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, w = lo
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    return Int4Groups(q, scale, lo + 8 * scale)


def fits_int4(out_features: int, in_features: int, group: int = GROUP) -> bool:
    """The CPU kernel's shape rules: N a multiple of 16, K of the group (32, 64, 128, 256)."""
    return out_features % 16 == 0 and in_features % group == 0 and group in (32, 64, 128, 256)


class Int4Linear(QuantLinear):
    """4-bit weights in groups along the input, packed for the CPU kernel."""

    def __init__(self, parts: Int4Groups, bias: torch.Tensor | None = None) -> None:
        N, K = parts.q.shape
        if not fits_int4(N, K, parts.group):
            raise EntropixError(f"int4 needs out_features % 16 == 0 and in_features % {parts.group} == 0, got {N}x{K}")
        super().__init__(K, N, bias)
        self.group = parts.group
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(parts.q.to(torch.int32), 1))
        # the kernel's layout: [K / group, N, (scale, zero)]
        sz = torch.stack([parts.scale.float(), parts.zero.float()], -1).transpose(0, 1)
        self.register_buffer("scales_zeros", sz.to(_COMPUTE).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group: int = GROUP) -> "Int4Linear":
        return cls(int4_groups(w, group), bias)

    @classmethod
    def from_groups(cls, parts: Int4Groups, bias: torch.Tensor | None = None) -> "Int4Linear":
        return cls(parts, bias)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=_COMPUTE)  # the kernel applied to the identity: W.T
        return self._mm(eye).float().t().contiguous()


def quantize_linear(lin: nn.Module, mode: str) -> nn.Module:
    """A quantized copy of an fp32/bf16 linear layer, or the layer itself where the mode's
    kernel cannot take its shape (int4 falls back to int8 there)."""
    w, b = lin.weight, lin.bias
    if mode == "int4" and fits_int4(*w.shape):
        return Int4Linear.from_float(w, b)
    if mode in ("int4", "int8"):
        return Int8Linear.from_float(w, b)
    return lin


# -- quantizing a model as it loads ------------------------------------------------------

# fused projection -> its parts, in the order model.Attention/MLP.fuse() concatenates them
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_device(mode: str, device: torch.device) -> None:
    if mode in ("int8", "int4"):
        if device.type != "cpu":
            raise EntropixError(f"--quant {mode} runs on the CPU (PyTorch's CPU kernels); use --quant none on {device.type}")
        if not available(mode):
            raise EntropixError(f"--quant {mode}: this PyTorch ({torch.__version__}) lacks the CPU kernel")


def stored_int4(src, name: str) -> Int4Groups | None:
    """A Q4_1-stored weight as int4 groups of 32, exactly as stored (no fp32 copy), or None."""
    read = getattr(getattr(src, "ckpt", None), "read_q4_1", None)
    blocks = read(name) if read is not None else None
    if blocks is None:
        return None
    q, d, m = (torch.from_numpy(a) for a in blocks)
    return Int4Groups(q, d, m + 8 * d)


def _build(parts: list, biases: list, mode: str) -> nn.Module:
    """One (possibly fused) quantized projection from its parts: Int4Groups or fp32 weights."""
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    if mode == "int4" and all(isinstance(p, Int4Groups) for p in parts):
        return Int4Linear.from_groups(Int4Groups.cat(parts), bias)
    w = torch.cat([_dense(p) for p in parts])
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight, lin.bias = nn.Parameter(w, requires_grad=False), bias
    return quantize_linear(lin, mode)


def _dense(p) -> torch.Tensor:
    if isinstance(p, Int4Groups):
        g = p.group
        N, K = p.q.shape
        w = (p.q.float() - 8).view(N, K // g, g) * p.scale[..., None] + p.zero[..., None]
        return w.view(N, K)
    return p.float()


def load_owner(owner: nn.Module, prefix: str, names: list[str], get, src, mode: str, fuse: bool) -> None:
    """Fill an attention or MLP module whose projections are to be quantized: norms and biases
    are placed by `get(name) -> tensor` as usual, each projection is read (Q4_1 blocks as they
    are under int4) and built quantized, fused if `fuse`. The fp32 copy, where one is made,
    is of this module's weights only."""
    from .loader import _place

    linears = {n: m for n, m in owner.named_children() if isinstance(m, nn.Linear)}
    weights: dict[str, object] = {}
    for name in names:
        leaf = name[len(prefix) + 1:]
        child, _, param = leaf.partition(".")
        if child in linears and param == "weight":
            exact = stored_int4(src, name) if mode == "int4" else None
            weights[child] = exact if exact is not None else get(name)
        else:
            _place(owner, leaf, get(name))
    groups = {f: ps for f, ps in _FUSED.items() if fuse and all(p in weights for p in ps)}
    done: set[str] = set()
    for fused, members in groups.items():
        biases = [getattr(linears[m], "bias", None) for m in members]
        setattr(owner, fused, _widened(fused, _build([weights[m] for m in members], biases, mode)))
        for m in members:
            delattr(owner, m)
        done.update(members)
    for child, w in weights.items():
        if child not in done:
            setattr(owner, child, _widened(child, _build([w], [linears[child].bias], mode)))


_GATING = ("gate_up_proj", "gate_proj", "up_proj")  # their outputs meet in silu(gate) * up


def _widened(name: str, module: nn.Module) -> nn.Module:
    if isinstance(module, QuantLinear) and name in _GATING:
        module.widen = True
    return module


# The vocabulary projection's mode under each --quant. int4 groups there cost the embedded
# model ~5 in max logit error (the tied embedding is stored as Q8_0, so nothing maps onto
# int4 exactly) against ~0.7 for int8 rows, and greedy text changes: it stays int8.
HEAD = {"int8": "int8", "int4": "int8"}


def quantize_output(model: nn.Module, mode: str, head: str | None = None) -> None:
    """The vocabulary projection quantized too (the embedding lookup keeps its own weights:
    it reads one row per token); `head` overrides HEAD[mode]."""
    model.lm_head = quantize_linear(model.lm_head, head or HEAD[mode])


def quantize_model(model: nn.Module, mode: str, head: str | None = None) -> nn.Module:
    """Quantize an already loaded single-device model in place (tests, tiny models)."""
    from .model import MLP, Attention

    check_device(mode, model.device)
    if mode == "none":
        return model
    for module in list(model.modules()):
        if type(module) in (Attention, MLP):
            for child, lin in list(module.named_children()):
                if isinstance(lin, nn.Linear):
                    setattr(module, child, _widened(child, quantize_linear(lin, mode)))
    quantize_output(model, mode, head)
    return model


def quant_mode(model: nn.Module) -> str:
    """What a loaded model's projections are: none, int8, int4 (int4 with int8 where shapes forced it)."""
    kinds = {type(m) for m in model.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else "none"


def quantizable(module: nn.Module | None) -> bool:
    """Plain attention and MLP modules (MLA and MoE keep their own weights)."""
    from .model import MLP, Attention

    return type(module) in (Attention, MLP)


# What --quant auto means on a CPU: chosen by `entropix bench --modes` (README, "Decode speed").
AUTO_CPU = "int4"


def resolve(mode: str | None, device: torch.device) -> str:
    """A concrete mode: auto is AUTO_CPU on a CPU that has its kernel, none elsewhere."""
    mode = check_mode(mode)
    if mode == "auto":
        return AUTO_CPU if torch.device(device).type == "cpu" and available(AUTO_CPU) else "none"
    return mode

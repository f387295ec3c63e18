"""Weight-only quantized projections on the CPU: int8 per output channel, int4 in groups.

Decode reads every weight once per token, so its speed is set by the bytes of weights.
PyTorch's CPU kernels multiply bf16 activations by int8 rows (`_weight_int8pack_mm`, one
scale per row) or by packed 4-bit groups (`_weight_int4pack_mm_for_cpu`, a scale and a
zero per group of 32/64/128/256 inputs, w = (q - 8) * scale + zero for q in 0..15). With
fp32 activations the same kernels are 3-25x slower (measured on this repo's CI CPU), so a
quantized projection rounds its input to bf16 and widens the kernel's output back to the model's
dtype. The int4 kernel pays its dequantization again for every row: from int4_wide.WIDE_ROWS
rows on, int4_wide.py multiplies densely instead.

A llama.cpp 4-bit block of 32 weights (Q4_0, Q4_1, a Q4_K sub-block), w = d * q + m, is such
an int4 group with scale d and zero m + 8d: `Int4Linear.from_groups` takes the blocks as stored
(io.gguf.int4_groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import EntropixError
from . import int4_wide
from .layers import MLP
from .model import Attention
from .params import place

MODES = ("none", "int8", "int4")
CHOICES = ("auto", *MODES)
GROUP = 32  # inputs per int4 group: the size of a Q4_1 block
_COMPUTE = torch.bfloat16


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation dtype."""
    return x if x.dtype == _COMPUTE else x.to(_COMPUTE)


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
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (+ b) in x's dtype: the kernel computes in bf16, and its output is widened
        back so that the KV cache, the residual stream and every consumer see the model's one
        activation dtype (an indexed cache write, for one, does not promote)."""
        y = self._mm(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] the kernel multiplies by (for parity checks)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fits_int8(out_features: int, in_features: int) -> bool:
    """The int8 CPU kernel reads the inputs in vector-wide runs: 8 on AVX2, 16 on AVX-512.
    Other widths crash it or return NaN (a 20-wide expert on AVX2; 24, 40, 56 and 72 wide on
    AVX-512), so every machine takes the widths both can."""
    return in_features % 16 == 0


class Int8Linear(QuantLinear):
    """int8 weights, one bf16 scale per output row (symmetric, w = q * scale)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if not fits_int8(*q.shape):
            raise EntropixError(f"int8 needs in_features % 16 == 0, got {q.shape[0]}x{q.shape[1]}")
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
        return torch._weight_int8pack_mm(_bf16(x), self.qweight, self.scales)

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
        self.wide = int4_wide.usable(N, K, self.group)  # the dense path for many rows (int4_wide.py)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group: int = GROUP) -> "Int4Linear":
        return cls(int4_groups(w, group), bias)

    @classmethod
    def from_groups(cls, parts: Int4Groups, bias: torch.Tensor | None = None) -> "Int4Linear":
        return cls(parts, bias)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= int4_wide.WIDE_ROWS and self.wide:  # prefill chunks, wide batches
            return int4_wide.wide_mm(x, self.packed, self.scales_zeros, self.group)
        return torch._weight_int4pack_mm_for_cpu(_bf16(x), self.packed, self.group, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=_COMPUTE)  # the kernel applied to the identity: W.T
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).float().t().contiguous()


def quantize_linear(lin: nn.Module, mode: str) -> nn.Module:
    """A quantized copy of an fp32/bf16 linear layer, or the layer itself where the mode's
    kernel cannot take its shape (int4 falls back to int8 there, int8 to the dense layer)."""
    w, b = lin.weight, lin.bias
    if mode == "int4" and fits_int4(*w.shape):
        return Int4Linear.from_float(w, b)
    if mode in ("int4", "int8") and fits_int8(*w.shape):
        return Int8Linear.from_float(w, b)
    return lin


# -- quantizing a model as it loads ------------------------------------------------------

# fused projection -> its parts, in the order model.Attention/MLP.fuse() concatenates them
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
KINDS = ("int4", "int8", "dense")  # what one projection is held as


def check_device(mode: str, device: torch.device) -> None:
    if mode in ("int8", "int4"):
        if device.type != "cpu":
            raise EntropixError(f"--quant {mode} runs on the CPU (PyTorch's CPU kernels); use --quant none on {device.type}")
        if not available(mode):
            raise EntropixError(f"--quant {mode}: this PyTorch ({torch.__version__}) lacks the CPU kernel")


def _stored_bits(src, name: str) -> int | None:
    bits = getattr(getattr(src, "ckpt", None), "stored_bits", None)
    return bits(name) if bits is not None else None


def kind_of(src, name: str, shape: tuple[int, int], mode: str) -> str:
    """What projection `name` [N, K] becomes under `mode`. int4 / int8 quantize every projection
    (int8 where the int4 kernel cannot take the shape); auto keeps what the checkpoint stores:
    4-bit blocks on the int4 kernel (exact), Q8_0 on the int8 one, anything else dense."""
    int8 = "int8" if fits_int8(*shape) else "dense"
    if mode == "none":
        return "dense"
    if mode == "int4":
        return "int4" if fits_int4(*shape) else int8
    if mode == "int8":
        return int8
    bits = _stored_bits(src, name)
    if bits == 4 and fits_int4(*shape) and available("int4"):
        return "int4"
    return int8 if bits == 8 and available("int8") else "dense"


def stored_int4(src, name: str) -> Int4Groups | None:
    """A 4-bit-block weight (Q4_0, Q4_1, Q4_K) as int4 groups of 32, exactly as stored (no fp32
    copy), or None."""
    read = getattr(getattr(src, "ckpt", None), "read_int4", None)
    blocks = read(name) if read is not None else None
    if blocks is None:
        return None
    q, d, m = (torch.from_numpy(a) for a in blocks)
    return Int4Groups(q, d, m + 8 * d)


def _build(parts: list, biases: list, kind: str, dtype: torch.dtype) -> nn.Module:
    """One (possibly fused) projection of `kind` from its parts: Int4Groups or dense weights."""
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    if kind == "int4" and all(isinstance(p, Int4Groups) for p in parts):
        return Int4Linear.from_groups(Int4Groups.cat(parts), bias)
    w = torch.cat([_dense(p, dtype) for p in parts])
    if kind == "int4":
        return Int4Linear.from_float(w, bias)
    if kind == "int8":
        return Int8Linear.from_float(w, bias)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
    return lin


def _dense(p, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(p, Int4Groups):
        g = p.group
        N, K = p.q.shape
        w = (p.q.float() - 8).view(N, K // g, g) * p.scale[..., None] + p.zero[..., None]
        return w.view(N, K).to(dtype)
    return p.to(dtype)


def load_owner(owner: nn.Module, prefix: str, names: list[str], get, src, mode: str, fuse: bool,
               dtype: torch.dtype) -> None:
    """Fill an attention or MLP module whose projections may be quantized: norms and biases are
    placed by `get(name) -> tensor` as usual, each projection is read (4-bit blocks as they are
    where it becomes int4) and built as its kind (kind_of); q/k/v and gate/up are fused where
    `fuse` and all members are of one kind; dense ones are in `dtype`, the model's. A dense copy,
    where one is made, is of this module only."""
    linears = {n: m for n, m in owner.named_children() if isinstance(m, nn.Linear)}
    weights: dict[str, object] = {}
    kinds: dict[str, str] = {}
    for name in names:
        leaf = name[len(prefix) + 1:]
        child, _, param = leaf.partition(".")
        if child in linears and param == "weight":
            kinds[child] = kind_of(src, name, tuple(linears[child].weight.shape), mode)
            exact = stored_int4(src, name) if kinds[child] == "int4" else None
            weights[child] = exact if exact is not None else get(name)
        else:
            place(owner, leaf, get(name))
    groups = {f: ps for f, ps in _FUSED.items()
              if fuse and all(p in weights for p in ps) and len({kinds[p] for p in ps}) == 1}
    done: set[str] = set()
    for fused, members in groups.items():
        biases = [getattr(linears[m], "bias", None) for m in members]
        setattr(owner, fused, _build([weights[m] for m in members], biases, kinds[members[0]], dtype))
        for m in members:
            delattr(owner, m)
        done.update(members)
    for child, w in weights.items():
        if child not in done:
            setattr(owner, child, _build([w], [linears[child].bias], kinds[child], dtype))


# The vocabulary projection's mode under an explicit --quant. int4 groups there cost the
# embedded model ~5 in max logit error (the tied embedding is stored as Q8_0, so nothing maps
# onto int4 exactly) against ~0.7 for int8 rows, and greedy text changes: it stays int8.
HEAD = {"int8": "int8", "int4": "int8"}


def quantize_output(model: nn.Module, mode: str, head: str | None = None, src=None) -> bool:
    """The vocabulary projection quantized too (the embedding lookup keeps its own weights: it
    reads one row per token); `head` overrides HEAD[mode]. Under auto it follows how the
    checkpoint stores it (the embedding, where tied). False where it stays dense."""
    if mode == "auto" and head is None:
        name = "embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
        kind = kind_of(src, name, tuple(model.lm_head.weight.shape), "auto")
        exact = stored_int4(src, name) if kind == "int4" else None
        if kind == "dense":
            return False
        model.lm_head = Int4Linear.from_groups(exact) if exact is not None else quantize_linear(model.lm_head, kind)
        return True
    model.lm_head = quantize_linear(model.lm_head, head or HEAD[mode])
    return True


def quantize_model(model: nn.Module, mode: str, head: str | None = None) -> nn.Module:
    """Quantize an already loaded single-device model in place (tests, tiny models)."""
    check_device(mode, model.device)
    if mode == "none":
        return model
    for module in list(model.modules()):
        if type(module) in (Attention, MLP):
            for child, lin in list(module.named_children()):
                if isinstance(lin, nn.Linear):
                    setattr(module, child, quantize_linear(lin, mode))
    quantize_output(model, mode, head)
    return model


def weight_kinds(model: nn.Module) -> dict[str, int]:
    """How many projections (the vocabulary one included) are held as each kind."""
    count = dict.fromkeys(KINDS, 0)
    for m in model.modules():
        kind = "int4" if isinstance(m, Int4Linear) else "int8" if isinstance(m, Int8Linear) else \
            "dense" if isinstance(m, nn.Linear) else None
        if kind:
            count[kind] += 1
    return count


def quant_mode(model: nn.Module) -> str:
    """What a loaded model's projections are: none, int8, int4 (int4 with int8 or dense ones where
    shapes or the checkpoint's storage made them so)."""
    kinds = weight_kinds(model)
    return "int4" if kinds["int4"] else "int8" if kinds["int8"] else "none"


def quantizable(module: nn.Module | None) -> bool:
    """Plain attention and MLP modules (MLA and MoE keep their own weights)."""
    return type(module) in (Attention, MLP)


def resolve(mode: str | None, device: torch.device, ckpt=None) -> str:
    """A concrete mode. auto means: on a CPU with the kernels, each tensor as the checkpoint
    stores it ("auto", where anything is stored in 4- or 8-bit blocks); dense ("none") for a
    checkpoint of plain floats and on CUDA and MPS, where these kernels do not run."""
    mode = check_mode(mode)
    if mode != "auto":
        return mode
    if torch.device(device).type != "cpu" or not available("int8") or ckpt is None:
        return "none"
    stored = getattr(ckpt, "stored_bits", lambda name: None)
    return "auto" if any(stored(n) for n in ckpt.names()) else "none"

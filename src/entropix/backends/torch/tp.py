"""Tensor parallelism for the PyTorch Transformer, applied from outside the model.

Each rank holds a part of every layer and reads only that part from the checkpoint:

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-wise (output rows: heads, hidden units)
    o_proj, down_proj                            row-wise (input columns), all-reduced after
    embed_tokens                                 vocabulary rows; a lookup outside them is 0, summed over ranks
    lm_head                                      vocabulary rows; the logits are gathered, so every
                                                 rank's sampler sees the whole vocabulary
    norms                                        whole on every rank

Query heads are split in contiguous runs; each rank keeps the key/value heads its query
heads read (so the KV cache is split with them). When the heads do not split evenly over
KV groups (the embedded model has 9 query and 3 KV heads), a rank may hold a KV head that
another rank holds too, or one copy per query head: the arithmetic stays that of one device.
The attention statistics of the sampler are computed per local head and gathered, with the
mean over all heads all-reduced, so the sampler decides as on one device.

Collectives are torch.distributed's (gloo on the CPU, NCCL on CUDA); with `group=None` a
shard is built without any (to inspect what a rank would hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ... import EntropixError
from ...config import ModelConfig
from ...io.checkpoint import Checkpoint
from ...plan import balanced, split_heads
from .kvcache import KVCache
from .loader import resolve_device, resolve_dtype, tensor_source
from .params import place
from .layers import HeadStats, Linear, softcap
from .model import Transformer


@dataclass(frozen=True)
class RankSlices:
    """What one rank of `world` holds of a model with config `cfg`."""

    rank: int
    world: int
    heads: tuple[int, int]  # query heads [lo, hi)
    kv_heads: tuple[int, ...]  # global KV head of each local KV head (cache order)
    ffn: tuple[int, int]  # feed-forward units [lo, hi)
    vocab: tuple[int, int]  # vocabulary rows [lo, hi)
    head_counts: tuple[int, ...]  # query heads per rank (for gathers)
    vocab_counts: tuple[int, ...]  # vocabulary rows per rank

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]


def rank_slices(cfg: ModelConfig, rank: int, world: int) -> RankSlices:
    """How `cfg` is split over `world` ranks, for `rank`; a clear error when it cannot be."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if world < 1 or not 0 <= rank < world:
        raise EntropixError(f"rank {rank} of a tensor-parallel group of {world} does not exist")
    if world > H:
        raise EntropixError(f"--tp {world} is more than the model's {H} attention heads")
    heads, kv = split_heads(H, Hkv, world, rank)
    counts = tuple(hi - lo for lo, hi in (split_heads(H, Hkv, world, r)[0] for r in range(world)))
    return RankSlices(rank, world, heads, kv, balanced(cfg.intermediate_size, world, rank),
                      balanced(cfg.vocab_size, world, rank), counts,
                      tuple(hi - lo for lo, hi in (balanced(cfg.vocab_size, world, r) for r in range(world))))


# -- collectives -----------------------------------------------------------------------------

def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def gather_last(x: torch.Tensor, counts: tuple[int, ...], group) -> torch.Tensor:
    """Concatenate every rank's x [..., counts[rank]] along the last dimension, in rank order.
    Parts are padded to the longest (gloo gathers equal sizes only)."""
    if group is None or len(counts) == 1:
        return x
    most = max(counts)
    if x.shape[-1] < most:
        x = F.pad(x, (0, most - x.shape[-1]))
    parts = [torch.empty_like(x) for _ in counts]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, counts)], dim=-1)


# -- parallel modules -----------------------------------------------------------------------

class RowParallelLinear(Linear):
    """This rank's input columns of a projection; the partial products are summed over ranks."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(super().forward(x), self.group)


class GatheredLinear(Linear):
    """This rank's output rows of the vocabulary projection; the logits are gathered whole."""

    group = None
    counts: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_last(super().forward(x), self.counts, self.group)


class VocabEmbedding(nn.Module):
    """This rank's vocabulary rows of the embedding; tokens outside them look up zeros and the
    sum over ranks is the full lookup (exactly: every other term is 0)."""

    def __init__(self, lo: int, hi: int, dim: int, group) -> None:
        super().__init__()
        self.lo, self.hi, self.group = lo, hi, group
        self.weight = nn.Parameter(torch.empty(hi - lo, dim), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inside = (tokens >= self.lo) & (tokens < self.hi)
        x = F.embedding((tokens - self.lo).clamp(0, self.hi - self.lo - 1), self.weight)
        return _all_reduce(x * inside[..., None].to(x.dtype), self.group)


def sharded_head_stats(s: RankSlices, n_heads: int, group, scale: float | None = None, cap: float = 0.0):
    """The model's newest-query statistics over this rank's heads, gathered over ranks. The
    deviation compares each head with the mean over all heads: that mean is all-reduced. `scale`
    and `cap` as the attention's own (Gemma: query_pre_attn_scalar, soft cap)."""

    def head_stats(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> HeadStats:
        B, Hl, D = q.shape
        Hkv, S = keys.shape[1], keys.shape[2]
        scores = (q.view(B, Hkv, Hl // Hkv, D) @ keys.transpose(-1, -2)).view(B, Hl, S).float()
        scores = scores * (1.0 / math.sqrt(D) if scale is None else scale)
        if cap:
            scores = softcap(scores, cap)
        scores = scores.masked_fill(~valid[:, None, :], 0.0)
        probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        mean = _all_reduce(probs.sum(1, keepdim=True), group) / n_heads
        entropy = torch.special.entr(probs).sum(-1) * (1.0 / math.log(2))
        deviation = (probs - mean).abs().sum(-1)
        n_valid = valid.sum(-1, keepdim=True).clamp_min(1).float()
        local = torch.stack([entropy, deviation, scores.abs().sum(-1) / n_valid], 1)  # [B, 3, Hl]
        every = gather_last(local, s.head_counts, group)  # [B, 3, H]
        return HeadStats(every[:, 0], every[:, 1], every[:, 2])

    return head_stats


def _check_supported(cfg: ModelConfig) -> None:
    """Tensor parallelism splits Llama-style attention and MLP modules; refuse what it would get wrong.
    Per-head q/k norms (one weight for every head) and Gemma's extra norms stay whole on each rank."""
    extra = [e for e in cfg.beyond_llama() if e not in ("q/k norms", "Gemma blocks")]
    if extra:
        raise EntropixError(f"--tp runs Llama-style models (llama, mistral, qwen3, gemma2, gemma3) for now; this {cfg.arch} model has "
                            f"{', '.join(extra)}: run it with --tp 1")


def shard(model: Transformer, s: RankSlices, group) -> Transformer:
    """Replace a (meta) model's modules by this rank's parts; the weights are loaded after."""
    cfg = model.config
    _check_supported(cfg)
    C, D = cfg.hidden_size, cfg.head_dim
    Hl, Hkvl, Fl, Vl = s.n_heads, len(s.kv_heads), s.ffn[1] - s.ffn[0], s.vocab[1] - s.vocab[0]
    with torch.device("meta"):
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            a.n_heads, a.n_kv = Hl, Hkvl
            a.q_proj, a.k_proj, a.v_proj = Linear(C, Hl * D, bias=False), Linear(C, Hkvl * D, bias=False), \
                Linear(C, Hkvl * D, bias=False)
            a.o_proj = RowParallelLinear(Hl * D, C, bias=False)
            a.head_stats = sharded_head_stats(s, cfg.num_attention_heads, group, a.scale, a.cap)
            m.gate_proj, m.up_proj = Linear(C, Fl, bias=False), Linear(C, Fl, bias=False)
            m.down_proj = RowParallelLinear(Fl, C, bias=False)
            a.o_proj.group = m.down_proj.group = group
        model.embed_tokens = VocabEmbedding(*s.vocab, C, group)
        model.lm_head = GatheredLinear(C, Vl, bias=False)
    model.lm_head.group, model.lm_head.counts = group, s.vocab_counts

    def new_cache(batch: int, capacity: int) -> KVCache:  # this rank's KV heads only
        cap = (capacity + 255) // 256 * 256
        return KVCache(cfg.num_hidden_layers, batch, Hkvl, D, cap, model.device, model.dtype)

    model.new_cache = new_cache
    model.tp = s
    return model


# -- loading a rank's part ------------------------------------------------------------------

def _rows(src, name: str, dim: int, runs: list[tuple[int, int]]) -> torch.Tensor:
    parts = [src.get_slice(name, dim, lo, hi) for lo, hi in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _runs(heads: tuple[int, ...], size: int) -> list[tuple[int, int]]:
    """Row ranges of the given heads (size rows each), consecutive heads merged."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        if runs and runs[-1][1] == h * size:
            runs[-1] = (runs[-1][0], (h + 1) * size)
        else:
            runs.append((h * size, (h + 1) * size))
    return runs


def read_part(src, name: str, s: RankSlices, cfg: ModelConfig) -> torch.Tensor:
    """This rank's part of parameter `name`, read from the checkpoint (only that part)."""
    D, leaf = cfg.head_dim, name.split(".")[-2] if "." in name else name
    q_rows = [(s.heads[0] * D, s.heads[1] * D)]
    if leaf == "q_proj":
        return _rows(src, name, 0, q_rows)
    if leaf in ("k_proj", "v_proj"):
        return _rows(src, name, 0, _runs(s.kv_heads, D))
    if leaf == "o_proj":
        return _rows(src, name, 1, q_rows)
    if leaf in ("gate_proj", "up_proj"):
        return _rows(src, name, 0, [s.ffn])
    if leaf == "down_proj":
        return _rows(src, name, 1, [s.ffn])
    if leaf in ("embed_tokens", "lm_head"):
        return _rows(src, name, 0, [s.vocab])
    return src.get(name)  # norms: whole


def load_shard(ckpt: Checkpoint, rank: int, world: int, device="auto", dtype="auto", group=None) -> Transformer:
    """Rank `rank`'s part of the checkpoint's model, read slice by slice (peak: the part plus
    one slice). With group=None the collectives are left out (inspection and tests)."""
    dev = resolve_device(device)
    src = tensor_source(ckpt)
    dt = resolve_dtype(dtype, dev, src.native_dtype)
    cfg = src.config
    s = rank_slices(cfg, rank, world)
    with torch.device("meta"):
        model = Transformer(cfg)
    shard(model, s, group)
    for name, _ in list(model.named_parameters()):
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # finish_setup() ties it to this rank's embedding rows (the same rows)
        t = read_part(src, name, s, cfg).to(device=dev, dtype=dt).contiguous()
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()  # a view of a whole mapped tensor: keep only the part
        place(model, name, t)
    freqs = ckpt.rope_freq_factors
    model.finish_setup(torch.from_numpy(freqs) if freqs is not None else None)
    return model.eval()

"""Baseline samplers: greedy, temperature, top-k, top-p, min-p.

Filters run in the conventional order (temperature, top-k, top-p, min-p) on a whole
batch at once, with per-row parameters. Every row draws from its own
`torch.Generator`, so a row's text depends only on its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from . import EntropixError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 switch a filter off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        check_params(self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def check_params(temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None) -> None:
    """Raise EntropixError with one clear line for an out-of-range value."""
    import math

    if temperature is not None and (not math.isfinite(temperature) or temperature < 0 or temperature > 100):
        raise EntropixError(f"temperature must be between 0 and 100, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise EntropixError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
    if top_p is not None and (not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise EntropixError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and (not math.isfinite(min_p) or not 0 <= min_p <= 1):
        raise EntropixError(f"min_p must be in [0, 1], got {min_p}")


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Return log-probabilities after all filters (-inf where removed).

    logits [B, V]; each parameter [B]. Rows with temperature 0 are left at
    temperature 1 here: the caller takes their argmax.
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # descending: top-p keeps the head
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above this token
    keep = keep & ((before < top_p[:, None]) | (rank == 0))
    keep = keep & (probs >= min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    out = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    return out.log_softmax(-1)


def draw(logprobs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from exp(logprobs), each row with its own generator.

    Exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i.
    """
    B, V = logprobs.shape
    noise = torch.empty_like(logprobs)
    for b, g in enumerate(generators):
        noise[b].exponential_(generator=g)
    return (logprobs - noise.log()).argmax(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


class RowLike(Protocol):
    generator: torch.Generator
    tokens: list[int]
    choice: int
    memory: dict[str, Any]


SamplerFn = Callable[[torch.Tensor, dict, Sequence[RowLike]], tuple[torch.Tensor, torch.Tensor | None]]


class PlainSampler:
    """Greedy or filtered sampling with fixed parameters (one request's rows)."""

    states = ("greedy", "sample")
    needs_attention = False

    def __init__(self, params: SamplingParams) -> None:
        self.params = params

    def __call__(self, logits: torch.Tensor, metrics: dict, rows: Sequence[RowLike]):
        B = logits.shape[0]
        if self.params.greedy:
            return logits.argmax(-1), None
        p, dev = self.params, logits.device
        logp = filter_logits(
            logits,
            torch.full((B,), p.temperature, device=dev),
            torch.full((B,), p.top_k, device=dev, dtype=torch.long),
            torch.full((B,), p.top_p, device=dev),
            torch.full((B,), p.min_p, device=dev),
        )
        return draw(logp, [r.generator for r in rows]), None

    def state_of(self, code: int | None) -> str:
        return "greedy" if self.params.greedy else "sample"


def make_sampler(name: str = "greedy", **kw: Any):
    """Factory for every sampler by name: greedy, sample (temperature/top-k/top-p/min-p),
    and those that later modules register (entropix, cot, ...)."""
    name = name.lower()
    if name in ("greedy", "argmax"):
        return PlainSampler(SamplingParams(temperature=0.0))
    if name in ("sample", "temperature", "min-p", "top-p", "top-k", "plain"):
        fields = {k: kw[k] for k in ("temperature", "top_k", "top_p", "min_p") if kw.get(k) is not None}
        return PlainSampler(SamplingParams(**fields))
    _load_registered()
    if name in SAMPLERS:
        return SAMPLERS[name](**kw)
    known = ", ".join(sorted({"greedy", "sample", *SAMPLERS}))
    raise EntropixError(f"unknown sampler {name!r} (known: {known})")


# Other modules add factories here: name -> callable(**kw) returning a sampler.
SAMPLERS: dict[str, Callable[..., Any]] = {}


def _load_registered() -> None:
    """Import the modules that register samplers (they import this one, so lazily)."""
    import importlib

    for mod in ("entropix.entropix", "entropix.cot"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise

"""Lookahead: a small tree search per token, done properly (the original "MCTS" decoder was none).

Where the model is unsure (entropy of the next-token distribution >= min_entropy bits), the
`candidates` most likely tokens are each rolled out `depth` tokens as rows of one batch
(forks of the row's KV cache: a rollout never touches the row itself): the candidate, then
greedy tokens. Candidate j scores

    score_j = mean(log-probabilities of its rollout's tokens) - entropy_weight * mean(entropy after each)

(nats), and the best candidate's first token is kept; the rollouts are dropped. Where the
model is sure, the argmax is taken without a search. Each record says what the token cost:
`lookahead_forwards` model calls (batched) and `lookahead_rows` rollout rows x steps.

This module is framework-free: the policy and the reference of the scoring; the torch
backend runs the rollouts (`backends/torch/lookahead.py`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import EntropixError
from .config import read_json_object
from .policy import TokenPolicy

LOOKAHEAD_REGIMES = ("calm", "search")
EXTRA_KEYS = ("lookahead_forwards", "lookahead_rows", "lookahead_score", "lookahead_rank")


@dataclass(frozen=True)
class Lookahead(TokenPolicy):
    candidates: int = 4
    depth: int = 3  # tokens per rollout, the candidate included
    min_entropy: float = 1.0  # bits: search only at least this uncertain (0: at every token)
    entropy_weight: float = 1.0
    regimes: ClassVar[tuple[str, ...]] = LOOKAHEAD_REGIMES
    backends: ClassVar[tuple[str, ...]] = ("torch",)

    def __post_init__(self) -> None:
        for name, lo, hi in (("candidates", 1, 64), ("depth", 1, 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise EntropixError(f"lookahead: {name} must be an integer in [{lo}, {hi}], got {v!r}")
        for name in ("min_entropy", "entropy_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise EntropixError(f"lookahead: {name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "lookahead config") -> "Lookahead":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(k for k in data if not str(k).startswith("_")) - known:
            raise EntropixError(f"{source}: expected an object with keys among {', '.join(sorted(known))}")
        try:
            return cls(**{k: v for k, v in data.items() if not str(k).startswith("_")})
        except EntropixError as e:
            raise EntropixError(f"{source}: {str(e).removeprefix('lookahead: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Lookahead":
        return cls.from_dict(read_json_object(path), f"sampler config {path}")

    def forwards(self, searched: bool) -> int:
        """Model calls one output token costs: the row's own step, plus the rollout's when searched."""
        return 1 + self.depth if searched else 1


def scores(logprobs: np.ndarray, entropies: np.ndarray, entropy_weight: float) -> np.ndarray:
    """Candidate scores [c] from rollout log-probabilities and entropies [c, depth] (nats)."""
    return np.mean(logprobs, -1) - entropy_weight * np.mean(entropies, -1)

"""What goes into the host engine (Request) and what comes out of it (TokenRecord)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from ..sampler.config import BranchingConfig
from ..sampler.policy import TokenPolicy

_ids = itertools.count()


@dataclass(kw_only=True)
class TokenRecord:
    """One generated token of one row, with everything the consumers show or score. Built by
    keyword: fifteen fields in a row are too easy to shift by one."""

    request_id: str
    choice: int  # row number within its request (n > 1, CoT branches, forks)
    index: int  # position in the generated text
    token: int
    text: str  # text released with this token (may be "" mid-character or near a stop string)
    logprob: float  # under the model's own distribution (temperature 1, unfiltered)
    top: list[tuple[int, str, float]]  # most likely alternatives: (id, text, logprob)
    entropy: float
    varentropy: float
    margin: float
    attn: dict[str, float] | None
    regime: str  # the sampler's per-token regime that chose it (flowing, treading, branch, ...; greedy)
    finish_reason: str | None = None  # "stop" or "length" on the row's last token
    parent: tuple[int, int] | None = None  # first record of a fork: (parent choice, index it forked at)
    extra: dict[str, float] | None = None  # the policy's decision quantities (dslider, lookahead)

    @property
    def state(self) -> str:
        """The regime under its older name."""
        return self.regime

    def to_dict(self) -> dict[str, Any]:
        d = {
            "token": self.token, "text": self.text, "logprob": self.logprob,
            "top": [{"token": t, "text": s, "logprob": lp} for t, s, lp in self.top],
            "entropy": self.entropy, "varentropy": self.varentropy, "margin": self.margin,
            "regime": self.regime, "state": self.regime,  # "state": the field's name before 0.2, kept for readers of it
        }
        if self.attn is not None:
            d.update(self.attn)
        if self.finish_reason:
            d["finish_reason"] = self.finish_reason
        if self.parent is not None:
            d["parent"] = list(self.parent)
        if self.extra:
            d.update(self.extra)
        return d


@dataclass(frozen=True)
class PruneRule:
    """Stop a row once its confidence over the last `window` tokens falls below `threshold`
    (confidence-pruned voting, decode/deepconf.py). A token's confidence is the negative mean
    log-probability of its `top_k` most likely alternatives (scoring.token_confidence)."""

    window: int
    threshold: float
    top_k: int = 5


@dataclass
class Request:
    """One prompt decoded by one policy into n rows (more when branching forks them)."""

    prompt: list[int]
    policy: TokenPolicy
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    top_logprobs: int = 5
    branching: BranchingConfig | None = None  # fork rows where the policy's regime is "branch"
    first_choice: int = 0  # rows are choices first_choice.. (a strategy's later phase goes on numbering)
    prune: PruneRule | None = None  # stop rows whose recent confidence is low (finish_reason "pruned")
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def again(self, **changes: Any) -> "Request":
        """A new request (its own id) like this one, with some fields changed."""
        return replace(self, id=f"req-{next(_ids)}", **changes)

"""Per-row sampler state for hooks inside other engines (logits processors, samplers).

Our engine keeps each row's random stream, its tokens and its pause count; a hook called
by someone else's decode loop keeps the same state itself, in the same way (row seeds
from `decode.rng.row_seed`, draws counted per step, the policy's own host inputs), so a
seeded hook chooses what `entropix generate --seed S` chooses from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import EntropixError
from ..backends.base import SampleGroup, StepHost
from ..decode.rng import row_seed, take_draws
from ..sampler.policy import Entropix, TokenPolicy
from . import ops


@dataclass
class RowState:
    """One sequence: the attributes `TokenPolicy.host_inputs` reads, plus its random stream."""

    seed: int
    choice: int = 0
    tokens: list[int] = field(default_factory=list)  # chosen so far (not the prompt)
    pauses: int = 0
    draws: int = 0


def new_rows(seed: int | None, n: int) -> list[RowState]:
    return [RowState(row_seed(seed, c), c) for c in range(n)]


def group(policy: TokenPolicy, rows: Sequence[RowState]) -> SampleGroup:
    """This step's inputs for the rows (consumes their draws), as the engine's _groups."""
    return SampleGroup(policy, tuple(range(len(rows))), uniforms=take_draws(rows, policy.draws),
                       **policy.host_inputs(rows))


def take(policy: TokenPolicy, rows: Sequence[RowState], tokens: Sequence[int]) -> None:
    for r, t in zip(rows, tokens):
        r.tokens.append(int(t))
        r.pauses += policy.is_pause(int(t))


def logits_only(policy: TokenPolicy) -> TokenPolicy:
    """The policy a logits hook can run: entropix without attention; others as they are."""
    if isinstance(policy, Entropix) and policy.attention:
        import dataclasses

        return dataclasses.replace(policy, attention=False)
    return policy


def entropix_policy(config: Any = None, pause_id: int = -1, model_name: str | None = None) -> Entropix:
    """A logits-only entropix policy from a SamplerConfig, a profile dict / JSON path, or
    the built-in profile for model_name (None: the default profile)."""
    from ..sampler.catalog import entropix_config

    cfg = entropix_config({"sampler_config": config}, _Named(model_name))
    return Entropix(cfg, pause_id, attention=False)


@dataclass
class _Named:
    name: str | None


class LogitsSampler:
    """One sequence's logits-only choice in numpy: call it with the next-token logits [V].

    `last` holds the step's StepHost (token, regime code, entropy, varentropy, margin,
    top alternatives) for records; `history` the (token, regime) of every step.
    """

    def __init__(self, policy: TokenPolicy, seed: int | None = None, top_logprobs: int = 5) -> None:
        if policy.needs_attention:
            raise EntropixError("a logits hook has no attention metrics: use the logits-only entropix policy")
        self.policy, self.seed, self.k = policy, seed, max(1, top_logprobs)
        self.reset()

    def reset(self) -> None:
        self.row = new_rows(self.seed, 1)[0]
        self.last: StepHost | None = None
        self.history: list[tuple[int, str]] = []

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(1, -1)
        self.last = ops.sample(logits, [group(self.policy, [self.row])], min(self.k, logits.shape[-1]))
        tok = int(self.last.token[0])
        take(self.policy, [self.row], [tok])
        self.history.append((tok, self.regime))
        return tok

    @property
    def regime(self) -> str:
        """The regime that chose the last token ("?" before the first)."""
        code = int(self.last.code[0]) if self.last is not None else -1
        return self.policy.regimes[code] if 0 <= code < len(self.policy.regimes) else "?"


def forced(scores: np.ndarray, token: int) -> np.ndarray:
    """Logits that leave the engine's own sampler one choice: 0 at token, -inf elsewhere."""
    out = np.full_like(scores, -np.inf)
    out[..., token] = 0.0
    return out

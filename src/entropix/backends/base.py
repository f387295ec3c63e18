"""The seam between the host engine and a backend that computes.

The host engine (`entropix.decode`) owns rows, seeds, stops, forks and records and
imports no array framework. A backend owns the model, its KV cache and the pending
next-token logits of every row, and runs the sampler's device maths. Per decode step
the host makes four calls at most:

    sample(groups, top_k) -> StepHost   choose a token per row; one device -> host transfer
    select(rows)                        keep, reorder or repeat rows (finish, cancel, fork)
    advance(tokens, capture)            run the model one token for every row
    prefill(prompts, copies, capture)   append new rows (between steps)

Rows are numbered 0..rows-1 in the order the host knows them; every call keeps the
host's order.

Optional (the engine uses them when a backend has them, else whole prefills):

    max_chunk: int                                         preferred prompt tokens per chunk
    prefill_chunk(key, prompt, start, stop, copies, capture)  feed prompt[start:stop] of a prefill
                                        in progress (start 0 begins it); the last chunk adds the
                                        rows at the end, as prefill() does
    drop_prefill(key)                   forget an unfinished chunked prefill
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

# Attention statistics of the newest query over each row's valid keys, averaged over the
# captured layers (see `entropix.sampler.policy` for their definitions).
ATTN_KEYS = ("attn_entropy", "attn_entropy_var", "agreement", "interaction")
LOGIT_KEYS = ("entropy", "varentropy", "margin")


@dataclass(frozen=True)
class SampleGroup:
    """Rows that share one token policy, with the per-row inputs the host computed.

    policy:    a frozen policy from `entropix.sampler.policy` (Greedy, Sample, Entropix, Ranked)
    rows:      row numbers in the batch
    uniforms:  [n, policy.draws] float64 in [0, 1): the row's random draws for this step
    flags:     [n, 2] bool, Entropix only: (previous token is the pause token, a pause may be inserted)
    ranks:     [n] int, Ranked only: take the rank-th most likely token (0 = argmax)
    """

    policy: Any
    rows: tuple[int, ...]
    uniforms: np.ndarray | None = None
    flags: np.ndarray | None = None
    ranks: np.ndarray | None = None


@dataclass(frozen=True)
class StepHost:
    """What one sample() call hands the host: named arrays, one row per batch row.

    token [B] int, code [B] int (the policy's state index), logprob [B] (chosen token
    under the model's own distribution), entropy, varentropy (bits), margin [B],
    attn [B, 4] (ATTN_KEYS order) with attn_valid [B] saying which rows have them,
    top_ids / top_logprobs [B, K], most likely first.
    """

    token: np.ndarray
    code: np.ndarray
    logprob: np.ndarray
    entropy: np.ndarray
    varentropy: np.ndarray
    margin: np.ndarray
    attn: np.ndarray
    attn_valid: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    # Optional: a policy's per-row decision quantities (name -> [B], NaN in rows it did not
    # sample); records carry the finite ones. Backends without them leave it None.
    extra: dict[str, np.ndarray] | None = None

    @classmethod
    def from_matrix(cls, m: np.ndarray, k: int) -> "StepHost":
        """Unpack the [B, 11 + 2K] matrix a backend moved to the host in one transfer.

        Columns: token, code, logprob, entropy, varentropy, margin, 4 attention metrics,
        attention-valid flag, then K top ids and K top logprobs.
        """
        n = 11
        return cls(token=m[:, 0].astype(np.int64), code=m[:, 1].astype(np.int64), logprob=m[:, 2],
                   entropy=m[:, 3], varentropy=m[:, 4], margin=m[:, 5], attn=m[:, 6:10],
                   attn_valid=m[:, 10] > 0, top_ids=m[:, n:n + k].astype(np.int64), top_logprobs=m[:, n + k:n + 2 * k])


class Backend(Protocol):
    """What the host engine needs of a backend (torch, jax, mlx)."""

    name: str
    vocab_size: int

    @property
    def rows(self) -> int: ...

    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        """Append rows: prompt j is prefilled once and becomes copies[j] rows in a row."""

    def sample(self, groups: Sequence[SampleGroup], top_k: int) -> StepHost:
        """Metrics, each group's policy and the top_k alternatives for every row's pending logits."""

    def select(self, rows: Sequence[int]) -> None:
        """Keep rows in this order (a row may appear more than once: a fork)."""

    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        """Feed one token per row; the logits after it become pending."""

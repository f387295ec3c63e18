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

Optional, together (`ChunkedBackend`; the engine uses them where `chunked(backend)`, else whole prefills):

    max_chunk: int                                         preferred prompt tokens per chunk
    prefill_chunk(key, prompt, start, stop, copies, capture)  feed prompt[start:stop] of a prefill
                                        in progress (start 0 begins it); the last chunk adds the
                                        rows at the end, as prefill() does
    drop_prefill(key)                   forget an unfinished chunked prefill

The sampler's side of the seam is written once here, for every backend (and adapters/ops.py):
the step matrix's columns (STEP_COLUMNS, step_blocks, StepHost.from_matrix), the dispatch
from a group's policy to the backend's op (policy_op over the backend's own table), the
width of the step's one ranking, and the entropix table's arrays and their device cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeGuard

import numpy as np

from ..sampler.dslider import DSlider
from ..sampler.lookahead import Lookahead
from ..sampler.policy import Entropix

# Attention statistics of the newest query over each row's valid keys, averaged over the
# captured layers (see `entropix.sampler.policy` for their definitions).
ATTN_KEYS = ("attn_entropy", "attn_entropy_var", "agreement", "interaction")
LOGIT_KEYS = ("entropy", "varentropy", "margin")

# The step matrix sample() moves to the host in one transfer, [B, 11 + 2K (+ extras)]: these
# columns, then K top ids, K top log-probabilities, then StepHost.extra's columns in order.
STEP_COLUMNS = ("token", "code", "logprob", "entropy", "varentropy", "margin") + ATTN_KEYS + ("attn_valid",)
ATTN_VALID = STEP_COLUMNS.index("attn_valid")


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

    token [B] int, code [B] int (the policy's regime index), logprob [B] (chosen token
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
    def from_matrix(cls, m: np.ndarray, k: int, extra: Sequence[str] = ()) -> "StepHost":
        """Unpack the step matrix (STEP_COLUMNS, K top ids, K top logprobs, then the `extra` columns)."""
        c = {name: m[:, i] for i, name in enumerate(STEP_COLUMNS)}
        n = len(STEP_COLUMNS)
        a = STEP_COLUMNS.index(ATTN_KEYS[0])
        return cls(token=c["token"].astype(np.int64), code=c["code"].astype(np.int64), logprob=c["logprob"],
                   entropy=c["entropy"], varentropy=c["varentropy"], margin=c["margin"],
                   attn=m[:, a:a + len(ATTN_KEYS)], attn_valid=c["attn_valid"] > 0,
                   top_ids=m[:, n:n + k].astype(np.int64), top_logprobs=m[:, n + k:n + 2 * k],
                   extra={key: m[:, n + 2 * k + j] for j, key in enumerate(extra)} or None)


def step_blocks(token, code, logprob, entropy, varentropy, margin, attn, attn_valid, top_ids, top_logprobs,
                extra: Sequence[Any] = ()) -> list:
    """The step matrix's blocks in column order, each [B, n], for a backend to cast to fp32 and
    concatenate in its own framework. Per-row values are [B], attn [B, 4], top_* [B, K], extra [B] each."""
    per_row = [token, code, logprob, entropy, varentropy, margin]
    return [a[:, None] for a in per_row] + [attn, attn_valid[:, None], top_ids, top_logprobs] + [e[:, None] for e in extra]


# -- one policy dispatch for every backend ------------------------------------------------------

def policy_op(ops: Mapping[type, Callable], policy: Any, backend: str) -> Callable:
    """The op a backend registered for this policy's type (ops: policy class -> its function)."""
    for cls in type(policy).__mro__:
        if cls in ops:
            return ops[cls]
    raise TypeError(f"the {backend} backend has no ops for policy {type(policy).__name__}")


# How many of the most likely tokens a policy's op reads; the others read at most the two of the margin.
_WIDTH: dict[type, Callable[[Any], int]] = {Entropix: lambda p: p.config.max_top_k,
                                            DSlider: lambda p: p.config.support, Lookahead: lambda p: p.candidates}


def candidates(policy: Any, vocab: int) -> int:
    """The most likely tokens a policy's op reads (every regime keeps at most that many)."""
    width = _WIDTH.get(type(policy))
    return min(width(policy), vocab) if width else 0


def ranking_width(groups: Sequence[SampleGroup], top_k: int, vocab: int) -> int:
    """How many most likely tokens a step's one ranking holds: the top_k alternatives, the two of
    the margin and every group's candidates."""
    return max([top_k, 2] + [candidates(g.policy, vocab) for g in groups])


def pause_flags(group: SampleGroup) -> tuple[np.ndarray | None, np.ndarray | None]:
    """An entropix group's (prev, ok) [n] bool, each None when no row has it: the host knows, so a
    backend leaves those ops out (and a compiled one compiles without them)."""
    flags = np.asarray(group.flags, dtype=bool)
    prev, ok = flags[:, 0], flags[:, 1]
    return (prev if prev.any() else None), (ok if ok.any() else None)


def entropix_arrays(policy: Entropix) -> dict[str, Any]:
    """An entropix policy's regime table, thresholds, pause id and typicality weight as fp32 / int
    host arrays (a backend moves them to its device once: TableCache)."""
    t, c = policy.table(), policy.config
    out: dict[str, Any] = {
        "W": np.asarray(t.weights, np.float32), "lo": np.asarray(t.lower, np.float32),
        "hi": np.asarray(t.upper, np.float32), "is_int": np.asarray(t.is_int, bool),
        "off": np.asarray(t.offset, np.float32), "code_to_col": np.asarray(t.code_to_column, np.int32),
        "pause_id": np.int32(policy.pause_id), "typicality_weight": np.float32(c.typicality_weight)}
    for name in ("low_ent", "low_vent", "med_ent", "med_vent", "high_ent", "high_vent"):
        out[name] = np.float32(getattr(c, name))
    return out


class TableCache:
    """A backend's device copies of entropix policies' arrays, built once per policy; the newest
    64 are kept (a server sees many sampler_configs). Keyed by the whole policy: its thresholds
    and pause id travel with the table."""

    def __init__(self, build: Callable[[Entropix], Any], size: int = 64) -> None:
        self.build, self.size = build, size
        self._items: dict[Entropix, Any] = {}

    def __call__(self, policy: Entropix) -> Any:
        if policy not in self._items:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[policy] = self.build(policy)
        return self._items[policy]


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


class ChunkedBackend(Backend, Protocol):
    """A backend that also reads long prompts in chunks between decode steps (torch)."""

    max_chunk: int  # preferred prompt tokens per chunk

    def prefill_chunk(self, key: object, prompt: Sequence[int], start: int, stop: int, copies: int,
                      capture: bool) -> None:
        """Feed prompt[start:stop] of the prefill `key` (start 0 begins it); the last chunk
        (stop == len(prompt)) adds its `copies` rows at the end, as prefill() does."""

    def drop_prefill(self, key: object) -> None:
        """Forget an unfinished chunked prefill (its request was cancelled)."""


def chunked(backend: Backend) -> TypeGuard[ChunkedBackend]:
    """Whether a backend has the optional chunked-prefill members (`ChunkedBackend`)."""
    return (callable(getattr(backend, "prefill_chunk", None)) and callable(getattr(backend, "drop_prefill", None))
            and isinstance(getattr(backend, "max_chunk", None), int))

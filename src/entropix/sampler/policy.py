"""Token policies: what a backend's sampler ops must do for a group of rows.

A policy is a frozen, hashable description (rows with equal policies are sampled in one
call, whatever request they belong to) plus the framework-free part of its logic: the
per-row inputs the host computes (pause flags, ranks), the number of random draws per
row and step, its regime names, and for entropix the regime table that every backend
applies in its own array idiom (`backends/*/ops.py`; the float64 reference is `sampler/reference.py`).

The entropix regimes, per row and step, from the entropy H and varentropy V (bits)
of the next-token distribution and the attention metrics:

  flowing   H < low_ent and V < low_vent             take the argmax
  treading  H >= high_ent and V < med_vent           uncertain but flat: insert the pause token
            (regime "pause"), else sample carefully    (never twice in a row, a budget per answer)
  branch    V >= high_vent and H < med_ent            a real fork: hotter, wider top-k
  resample  V >= high_vent and H >= med_ent           in the mist: hot resampling, narrower nucleus
  adaptive  everything else                           parameters adapted from the metrics;
                                                      best of N candidates by a per-candidate score

Attention metrics, of the newest query over each row's valid keys, averaged over the
captured layers: attn_entropy (mean over heads of each head's entropy, bits),
attn_entropy_var (its variance across heads), agreement (mean over heads of the summed
|head attention - mean head attention|) and interaction (mean |pre-softmax score|).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Sequence

import numpy as np

from .config import SamplerConfig, SamplingParams
# The regime codes and the regime function are the reference maths' (one formula, one place); re-exported here.
from .reference import (ADAPTIVE, BRANCH, ENTROPIX_REGIMES, FLOWING, PAUSE, RESAMPLE, TREADING,  # noqa: F401
                        entropix_regimes)

ENTROPIX_STATES = ENTROPIX_REGIMES  # the older name; tests import it

LEGEND = {
    "flowing": "confident: argmax",
    "treading": "uncertain and flat: careful sampling",
    "pause": "uncertain and flat: pause token inserted",
    "branch": "a fork: hotter, wider top-k",
    "resample": "lost in the mist: hot resampling",
    "adaptive": "in between: adapted parameters, best of N",
}


class TokenPolicy:
    """Defaults every policy shares; subclasses are frozen dataclasses."""

    regimes: ClassVar[tuple[str, ...]] = ("greedy",)  # the per-token decisions its records name, by code
    needs_attention: ClassVar[bool] = False
    backends: ClassVar[tuple[str, ...] | None] = None  # backend names with ops for it (None: every one)

    @property
    def label(self) -> str:
        return type(self).__name__.lower()

    @property
    def draws(self) -> int:
        """Uniform random numbers each row consumes per step."""
        return 0

    def host_inputs(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        """Per-row inputs computed on the host from the rows' tokens (no device reads)."""
        return {}

    def is_pause(self, token: int) -> bool:
        return False


@dataclass(frozen=True)
class Greedy(TokenPolicy):
    """The argmax; capture also computes the attention metrics (calibration reads them)."""

    capture: bool = False

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.capture


@dataclass(frozen=True)
class Sample(TokenPolicy):
    """Temperature, top-k, top-p and min-p (in that order), then one draw."""

    params: SamplingParams
    regimes: ClassVar[tuple[str, ...]] = ("sample",)

    @property
    def draws(self) -> int:
        return 1


@dataclass(frozen=True)
class Ranked(TokenPolicy):
    """CoT decoding: a row's first token is its rank-th most likely (rank = its branch
    number), every later token the argmax."""

    regimes: ClassVar[tuple[str, ...]] = ("cot-branch", "greedy")

    def host_inputs(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        return {"ranks": np.array([-1 if r.tokens else r.choice for r in rows], dtype=np.int64)}


@dataclass(frozen=True)
class Entropix(TokenPolicy):
    """The entropix sampler with one profile; pause_id -1 disables pause tokens.

    attention False is the logits-only mode (what a logits hook in another engine can do):
    the attention features weigh nothing in the table, so they need not be captured.
    """

    config: SamplerConfig
    pause_id: int = -1
    attention: bool = True
    regimes: ClassVar[tuple[str, ...]] = ENTROPIX_REGIMES

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.attention

    @property
    def draws(self) -> int:
        return self.config.n_candidates

    def host_inputs(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        """flags [n, 2]: (previous token is the pause token, a pause may be inserted now)."""
        pid, budget = self.pause_id, self.config.pause_budget
        prev = [bool(r.tokens) and r.tokens[-1] == pid for r in rows]
        ok = [pid >= 0 and not p and r.pauses < budget for p, r in zip(prev, rows)]
        return {"flags": np.array([prev, ok], dtype=bool).T.reshape(len(rows), 2)}

    def is_pause(self, token: int) -> bool:
        return token == self.pause_id >= 0

    def table(self) -> "EntropixTable":
        return entropix_table(self.config, self.attention)


# -- the entropix regime table --------------------------------------------------------------

@dataclass(frozen=True)
class EntropixTable:
    """Each regime's parameters are affine in the features f = [1, H, V, attn_entropy,
    attn_entropy_var, agreement, interaction], then clamped: one [B, 7] x [7, 20] product
    gives all of them and each row gathers its own regime's column, so the per-token
    cost is a few array ops whatever the batch.

    Column p * 5 + s holds parameter p (temperature, top_k, top_p, min_p) of regime s
    (COLUMNS order). Integer columns (top_k) are floored after adding `offset`.
    """

    weights: tuple[tuple[float, ...], ...]  # [7][20]
    lower: tuple[float, ...]  # [20]
    upper: tuple[float, ...]
    is_int: tuple[bool, ...]
    offset: tuple[float, ...]
    code_to_column: tuple[int, ...] = (4, 0, 0, 1, 2, 3)  # by regime code: flowing, treading, pause, branch, resample, adaptive

    COLUMNS: ClassVar[tuple[str, ...]] = ("treading", "branch", "resample", "adaptive", "flowing")


def _affine_rows(c: SamplerConfig) -> dict[tuple[str, str], list[float]]:
    """(parameter, regime) -> weights over the 7 features, with the original v2 formulas."""
    T0, k0, p0, m0 = c.temperature, float(c.top_k), c.top_p, c.min_p
    he, hv = max(c.high_ent, 1e-6), max(c.high_vent, 1e-6)
    return {
        ("T", "treading"): [1.3 * T0, 0, 0, 0.2 * T0, 0, 0, 0],  # v2: T0 (1.3 + 0.2 attn_ent), <= 1.5
        ("T", "branch"): [1.2 * T0, 0, 0, 0, 0, 0, 0.3 * T0],  # v2: T0 (1.2 + 0.3 interaction), <= 1.5
        ("T", "resample"): [2.0 * T0, 0, 0, 0, 0.5 * T0, 0, 0],  # v2: T0 (2 + 0.5 attn_var), now bounded
        # T0 (1 + 0.6 u + 0.2 attn_var - 0.2 agreement), u = (H / high_ent + V / high_vent) / 2: the
        # uncertainty relative to this model's own high levels, not raw bits (v2's 0.3 (H + V) in bits
        # only made sense for one model)
        ("T", "adaptive"): [T0, 0.3 * T0 / he, 0.3 * T0 / hv, 0, 0.2 * T0, -0.2 * T0, 0],
        ("T", "flowing"): [T0, 0, 0, 0, 0, 0, 0],
        ("K", "treading"): [k0, 0, 0, 0, 0, 0, 0],
        ("K", "branch"): [1.5 * k0, 0, 0, 0, 0, -0.5 * k0, 0],  # k0 (1 + 0.5 (1 - agreement)), >= 5
        ("K", "resample"): [k0, 0, 0, 0, 0, 0, 0],
        ("K", "adaptive"): [k0, 0, 0, 0, 0, -0.2 * k0, 0.3 * k0],  # k0 (1 + 0.3 interaction - 0.2 agreement)
        ("K", "flowing"): [1.0, 0, 0, 0, 0, 0, 0],  # top-1: the draw is the argmax
        ("P", "treading"): [p0, 0, 0, 0, 0, 0, 0],
        ("P", "branch"): [p0, 0, 0, 0, 0, 0, 0],
        ("P", "resample"): [p0, 0, 0, -0.2, 0, 0, 0],  # p0 - 0.2 attn_ent, >= 0.5
        ("P", "adaptive"): [p0, 0, 0, 0, 0.1 * p0, 0, 0],  # p0 (1 + 0.1 attn_var)
        ("P", "flowing"): [1.0, 0, 0, 0, 0, 0, 0],
        ("M", "treading"): [m0, 0, 0, 0, 0, 0, 0],
        ("M", "branch"): [m0, 0, 0, 0, 0, 0, 0],
        ("M", "resample"): [m0, 0, 0, 0, 0, 0, 0],
        ("M", "adaptive"): [m0, -0.25 * m0 / he, -0.25 * m0 / hv, 0, 0, 0, 0],  # m0 (1 - 0.5 u)
        ("M", "flowing"): [0.0, 0, 0, 0, 0, 0, 0],
    }


@lru_cache(maxsize=64)
def entropix_table(c: SamplerConfig, attention: bool = True) -> EntropixTable:
    rows = _affine_rows(c)
    if not attention:  # logits only: the features after H and V get no weight
        rows = {key: w[:3] + [0.0] * (len(w) - 3) for key, w in rows.items()}
    t_cap = min(1.5, c.max_temperature)
    bounds: dict[str, dict[str, tuple[float, float]]] = {  # (lower, upper) where not the default
        "T": {"treading": (1e-2, t_cap), "branch": (1e-2, t_cap)},
        "K": {"branch": (min(5.0, c.max_top_k), c.max_top_k)},
        "P": {"resample": (0.5, 1.0), "adaptive": (0.1, 1.0)},
        "M": {"adaptive": (min(0.01, c.min_p), 0.5)},
    }
    default = {"T": (1e-2, c.max_temperature), "K": (1.0, float(c.max_top_k)), "P": (1e-3, 1.0), "M": (0.0, 1.0)}
    cols, lo, hi, off = [], [], [], []
    for param in "TKPM":
        for reg in EntropixTable.COLUMNS:
            cols.append(rows[(param, reg)])
            a, b = bounds[param].get(reg, default[param])
            lo.append(float(a))
            hi.append(float(b))
            # top_k: floor for branch (v2's int()), round for adaptive; 1e-4 absorbs float error
            off.append(0.5 + 1e-4 if (param, reg) == ("K", "adaptive") else 1e-4)
    weights = tuple(tuple(float(col[f]) for col in cols) for f in range(7))  # [7][20]
    is_int = tuple(p == "K" for p in "TKPM" for _ in EntropixTable.COLUMNS)
    return EntropixTable(weights, tuple(lo), tuple(hi), is_int, tuple(off))


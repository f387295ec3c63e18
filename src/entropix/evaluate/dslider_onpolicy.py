"""DSlider's biases set on its own samples (the default of `entropix calibrate --sampler dslider`).

The greedy probe's quantiles (calibrate_dslider.py) see the running state along greedy text only.
Under DSlider's own sampling a surprising token raises the running surprisal, which raises the
outlier score, which makes the next token an outlier again: a row can lock into the dirichlet/ood
branches. The "ood" branch feeds that loop most, as it samples from the Dirichlet draw and not
from the model. So the probe's biases are a start, and the calibration prompts are decoded by
DSlider itself (DRAWS rows per prompt, fixed seeds: every decode is reproducible) until they show

  - a dirichlet+ood share over all tokens of at most `aim` (the target less MARGIN), and
  - no locked-in row: one whose longest run of consecutive dirichlet/ood tokens exceeds LOCK_RUN,
    or, with at least LOCK_MIN_TOKENS tokens, whose dirichlet+ood share exceeds LOCK_SHARE (the
    search keeps a margin here too: no run above AIM_RUN).

Stage 1 raises the Dirichlet bias (fewer outliers take "ood"), up to where every outlier of the
greedy text takes "dirichlet"; if that is not enough, stage 2 raises the outlier threshold
t = -outlier_bias (fewer outliers). Both shares fall as their bias rises, so each stage steps up from
its start (doubling the step) until a point passes, then bisects between the last failing and the
first passing point, within MAX_DECODES decodes in all. Sampled paths differ from one point to the
next, so the fall is not exact: only points whose decode passed are returned.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import numpy as np

from .. import EntropixError
from ..decode.records import Request
from ..sampler.dslider import DIRICHLET, DSLIDER_REGIMES, OOD, DSlider, DSliderConfig

TARGET = 0.30  # most dirichlet+ood share the profile may show on its own samples
MARGIN = 0.05  # the search aims this far below the target
LOCK_RUN = 16  # consecutive dirichlet/ood tokens: the EMAs (c ~ 0.7) forget a token within ~4
LOCK_SHARE = 0.60
LOCK_MIN_TOKENS = 16
AIM_RUN = 12  # the search's margin on LOCK_RUN: no run above this in the decodes it keeps
DRAWS = 2  # samples per prompt in each decode of the search
MAX_DECODES = 12
BISECT_TOL = 1 / 16  # of the first step: the bisection stops when the bracket is narrower


def row_seeds(n_prompts: int, draws: int, seed: int) -> list[tuple[int, int]]:
    """(prompt index, seed) of every row: draw k of prompt i samples with seed + k * n_prompts + i."""
    return [(i, seed + k * n_prompts + i) for k in range(draws) for i in range(n_prompts)]


def decode_regimes(lm, prompts: Sequence[str], cfg: DSliderConfig, max_tokens: int = 64, batch_size: int = 64,
                   seed: int = 0, draws: int = 1) -> list[np.ndarray]:
    """The regime code of every token DSlider(cfg) samples, per row of row_seeds (chat template)."""
    if max_tokens < 1 or batch_size < 1 or draws < 1:
        raise EntropixError(f"--max-tokens, --batch-size and draws must be at least 1, got {max_tokens}, "
                            f"{batch_size}, {draws}")
    policy, index = DSlider(cfg), {s: i for i, s in enumerate(DSLIDER_REGIMES)}
    rows = row_seeds(len(prompts), draws, seed)
    out: list[np.ndarray] = []
    for start in range(0, len(rows), batch_size):
        eng = lm.engine(())
        reqs = [Request(lm.tokenizer.encode_chat([{"role": "user", "content": prompts[i]}]), policy,
                        max_tokens=max_tokens, seed=sd, stop_ids=lm.tokenizer.stop_ids, top_logprobs=1)
                for i, sd in rows[start:start + batch_size]]
        eng.add(reqs)
        codes: dict[str, list[int]] = {r.id: [] for r in reqs}
        while eng.active:
            for r in eng.step():
                codes[r.request_id].append(index[r.regime])
        out += [np.array(codes[r.id], dtype=np.int64) for r in reqs]
    return out


def longest_run(outlier: np.ndarray) -> int:
    """Length of the longest run of True in a boolean row."""
    best = cur = 0
    for x in outlier:
        cur = cur + 1 if x else 0
        best = max(best, cur)
    return best


def locked_in(codes: np.ndarray) -> bool:
    """A row stuck in the outlier branches (see the module doc)."""
    out = (codes == DIRICHLET) | (codes == OOD)
    return longest_run(out) > LOCK_RUN or (out.size >= LOCK_MIN_TOKENS and out.mean() > LOCK_SHARE)


def summarize(rows: Sequence[np.ndarray]) -> dict[str, Any]:
    """Regime shares over all tokens, and per row the dirichlet+ood share, longest run and lock-in."""
    allc = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
    if allc.size == 0:
        raise EntropixError("the on-policy decode produced no tokens")
    out = [(r == DIRICHLET) | (r == OOD) for r in rows]
    return {
        "tokens": int(allc.size),
        "shares": {s: round(float((allc == i).mean()), 4) for i, s in enumerate(DSLIDER_REGIMES)},
        "outlier_share": round(float(((allc == DIRICHLET) | (allc == OOD)).mean()), 4),
        "per_row_outlier_share": [round(float(o.mean()), 4) if o.size else 0.0 for o in out],
        "per_row_longest_run": [longest_run(o) for o in out],
        "locked_in": [i for i, r in enumerate(rows) if locked_in(r)],
    }


def passes(summary: dict[str, Any], aim: float) -> bool:
    """The search's test: the share at most aim, no row locked in, no run above AIM_RUN."""
    return summary["outlier_share"] <= aim and not summary["locked_in"] and max(summary["per_row_longest_run"]) <= AIM_RUN


def search(measure: Callable[[float], dict[str, Any]], start: float, step: float, aim: float,
           history: list[dict[str, Any]], max_decodes: int = MAX_DECODES, upper: float | None = None
           ) -> tuple[float | None, dict[str, Any]]:
    """(x, its summary): the lowest x >= start (at most upper) whose measure(x) passes at aim, by doubling
    steps up from start, then bisection; None with the last summary when none passed. Each call of
    measure appends to history; the search stops when history holds max_decodes."""
    if not step > 0:
        raise EntropixError(f"on-policy search needs a step above 0, got {step}")
    top = float("inf") if upper is None else round(upper, 4)

    def clamp(x: float) -> float:  # the profile stores 4 decimals: decode what it will hold
        return min(round(x, 4), top)

    lo, hi = start, clamp(start)
    best, d = measure(hi), step
    while not passes(best, aim):  # bracket: double the step until a point passes
        if len(history) >= max_decodes or hi >= top:
            return None, best
        lo, hi = hi, clamp(start + d)
        best, d = measure(hi), d * 2
    while len(history) < max_decodes and hi - lo > max(BISECT_TOL * step, 1e-3):
        mid = round((lo + hi) / 2, 4)
        s = measure(mid)
        if passes(s, aim):
            hi, best = mid, s
        else:
            lo = mid
    return hi, best


def calibrate_onpolicy(lm, prompts: Sequence[str], start: DSliderConfig, step: float,
                       dirichlet_max: float, max_tokens: int = 64, batch_size: int = 64, target: float = TARGET,
                       seed: int = 0, draws: int = DRAWS, max_decodes: int = MAX_DECODES,
                       progress: bool = False) -> tuple[DSliderConfig, dict[str, Any]]:
    """start (the greedy probe's profile) with its Dirichlet bias, then if need be its outlier bias, moved
    until its own samples pass (module doc). step: stage 2's first step; dirichlet_max: stage 1's end."""
    if not 0 < target < 1:
        raise EntropixError(f"--target must be a share between 0 and 1, got {target}")
    aim, w_d = max(target - MARGIN, target / 2), start.dirichlet_threshold[0]
    history: list[dict[str, Any]] = []
    seen: dict[tuple[float, float], dict[str, Any]] = {}

    def measure(t: float, b_d: float) -> dict[str, Any]:
        if (t, b_d) not in seen:  # stage 2 starts where stage 1 ended
            cfg = dataclasses.replace(start, outlier_bias=-t, dirichlet_threshold=(w_d, b_d))
            s = seen[t, b_d] = summarize(decode_regimes(lm, prompts, cfg, max_tokens, batch_size, seed, draws))
            history.append({"outlier_bias": -t, "dirichlet_bias": b_d, "outlier_share": s["outlier_share"],
                            "locked_in": len(s["locked_in"]), "longest_run": max(s["per_row_longest_run"]),
                            "tokens": s["tokens"]})
            if progress:
                print(f"calibrate: on-policy decode {len(history)}: outlier_bias {-t:.4g}, dirichlet bias {b_d:.4g}: "
                      f"dirichlet+ood {s['outlier_share']:.1%}, {len(s['locked_in'])} rows locked in",
                      file=sys.stderr, flush=True)
        return seen[t, b_d]

    t0, b0 = round(-start.outlier_bias, 4), round(start.dirichlet_threshold[1], 4)
    # Stage 1: fewer "ood" steps (they sample off the model and feed the runaway), the outlier bias kept.
    b_d, summary = search(lambda b: measure(t0, b), b0, max(dirichlet_max - b0, 1e-3), aim, history, max_decodes,
                          upper=dirichlet_max)
    t: float | None = t0
    if b_d is None:  # Stage 2: every greedy outlier on "dirichlet" is not enough: fewer outliers
        b_d = round(dirichlet_max, 4)
        t, summary = search(lambda x: measure(x, b_d), t0, step, aim, history, max_decodes)
    if t is None:
        raise EntropixError(f"on-policy dslider calibration: dirichlet+ood {summary['outlier_share']:.1%} with "
                            f"{len(summary['locked_in'])} rows locked in after {len(history)} decodes (aim "
                            f"{aim:.0%}); give a larger --target or --policy greedy")
    cfg = dataclasses.replace(start, outlier_bias=-t, dirichlet_threshold=(w_d, b_d))
    stats = {"target": target, "aim": round(aim, 4), "seed": seed, "draws": draws, "decodes": len(history),
             "tokens_decoded": sum(h["tokens"] for h in history), "history": history,
             "greedy_quantiles_on_policy": seen[t0, b0], "on_policy": summary,
             "rows": f"draw k of prompt i samples with seed {seed} + k * {len(prompts)} + i",
             "lock_in": f"longest dirichlet/ood run > {LOCK_RUN}, or (>= {LOCK_MIN_TOKENS} tokens) "
                        f"dirichlet+ood share > {LOCK_SHARE}; the search also keeps runs <= {AIM_RUN}"}
    return cfg, stats

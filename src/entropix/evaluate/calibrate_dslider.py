"""Calibration of the DSlider and lookahead samplers from quantiles of a model's own text.

`entropix calibrate --sampler dslider` decodes the calibration prompts greedily with a DSlider
probe: the spec's step with every branch test forced to "argmax", so the row follows the
model's own greedy text while the sampler's state (running entropies, surprisal, Dirichlet)
moves along it as it would, and each record carries the quantities the tests compare. Then:

  outlier_bias          = -(90th percentile of the outlier score): about 1 token in 10 is an
                          outlier. With the original's weights every score is >= 0 (spec bug 6),
                          so the default bias 0 makes every step an outlier on any model.
  dirichlet_threshold   bias = the median, over those outlier tokens, of NLL - w_D * (running
                          NLL): half of the outliers take the Dirichlet branch, half "ood". The
                          NLL is a log-density over the K-token simplex whose scale grows with K
                          (spec bug 3), so the original bias 1.2 means nothing at K = 64.
  argmax_threshold      kept: it compares the top-k entropy (in nats, at most ln k) with a running
                          average of itself, a scale that does not depend on the model.

Those quantiles hold along greedy text only: under DSlider's own sampling one surprising token
raises the running surprisal and a row can stay an outlier for good. So by default (policy
"onpolicy") the Dirichlet bias is then raised (fewer "ood" steps) and, if need be, the outlier
bias lowered, decoding the prompts with DSlider itself, until its own samples keep the
dirichlet+ood share under the target and no row locks in (dslider_onpolicy.py). Policy "greedy"
stops after the quantiles.

`--sampler lookahead` sets min_entropy (bits) at the 75th percentile of the greedy text's
entropy: the search runs at the most uncertain quarter of the tokens.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import numpy as np

from .. import EntropixError
from ..decode.records import Request
from ..sampler.dslider import ARGMAX, DIRICHLET, DSLIDER_REGIMES, INLIER, OOD, DSlider, DSliderConfig
from ..sampler.lookahead import Lookahead
from .calibrate import collect_metrics
from .dslider_onpolicy import TARGET, calibrate_onpolicy

OUTLIER_QUANTILE = 0.90  # of the outlier score: 10% of tokens are outliers
DIRICHLET_QUANTILE = 0.50  # of the Dirichlet margin among outliers: half of them take "dirichlet"
LOOKAHEAD_QUANTILE = 0.75  # of the entropy (bits): the search runs at a quarter of the tokens
# The probe's shift of both tests: far beyond any score (hundreds at most), and small enough that the
# fp32 score keeps ~0.01 of its raw value (ulp 2^-7 at 1e5).
PROBE_SHIFT = 1e5
QS = (0.1, 0.25, 0.5, 0.75, 0.9)
POLICIES = ("onpolicy", "greedy")  # onpolicy: the greedy quantiles, then the search on DSlider's own samples


def probe_config(base: DSliderConfig) -> DSliderConfig:
    """base with every step an inlier that takes the argmax (the state still updates as in base)."""
    w_a, b_a = base.argmax_threshold
    return dataclasses.replace(base, outlier_bias=base.outlier_bias - PROBE_SHIFT,
                               argmax_threshold=(w_a, b_a + PROBE_SHIFT))


def collect_dslider(lm, prompts: Sequence[str], base: DSliderConfig, max_tokens: int = 64, batch_size: int = 64,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """Per-token DSlider quantities [N] along the greedy text of every prompt (chat template):
    raw outlier score (without the bias), top-k entropy and its running average, the Dirichlet
    NLL and its running average, and the full distribution's entropy (bits)."""
    if max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise EntropixError(f"--batch-size must be at least 1, got {batch_size}")
    probe = DSlider(probe_config(base))
    keys = {"score": "dslider_score", "topk": "dslider_topk_entropy", "topk_avg": "dslider_topk_ent_avg",
            "nll": "dslider_nll", "nll_avg": "dslider_nll_avg"}
    cols: dict[str, list[float]] = {k: [] for k in list(keys) + ["entropy"]}
    off_path = 0
    for start in range(0, len(prompts), batch_size):
        eng = lm.engine(())
        eng.add([Request(lm.tokenizer.encode_chat([{"role": "user", "content": p}]), probe, max_tokens=max_tokens,
                         seed=start + j, stop_ids=lm.tokenizer.stop_ids, top_logprobs=1)
                 for j, p in enumerate(prompts[start:start + batch_size])])
        while eng.active:
            for r in eng.step():
                off_path += r.regime != "argmax"
                for k, name in keys.items():
                    cols[k].append(r.extra[name])
                cols["entropy"].append(r.entropy)
        if progress:
            print(f"calibrate: {min(start + batch_size, len(prompts))}/{len(prompts)} prompts, "
                  f"{len(cols['entropy'])} tokens", file=sys.stderr, flush=True)
    if off_path:  # a score beyond PROBE_SHIFT: the text is no longer the greedy one
        raise EntropixError(f"dslider calibration: {off_path} probe steps left the argmax branch (score above 1e5?)")
    out = {k: np.array(v, dtype=np.float64) for k, v in cols.items()}
    out["score"] = out["score"] - (base.outlier_bias - PROBE_SHIFT)
    return out


def branch_codes(cfg: DSliderConfig, m: dict[str, np.ndarray]) -> np.ndarray:
    """The branch (regime code) each collected token would take under cfg (its running state as on the greedy text)."""
    outlier = m["score"] + cfg.outlier_bias > 0
    is_argmax = m["topk"] < cfg.argmax_threshold[0] * m["topk_avg"] + cfg.argmax_threshold[1]
    use_dir = m["nll"] < cfg.dirichlet_threshold[0] * m["nll_avg"] + cfg.dirichlet_threshold[1]
    return np.where(outlier, np.where(use_dir, DIRICHLET, OOD), np.where(is_argmax, ARGMAX, INLIER))


def dslider_thresholds(base: DSliderConfig, m: dict[str, np.ndarray]) -> DSliderConfig:
    """base with the outlier bias and the Dirichlet bias from quantiles of m (see the module doc)."""
    bias = -float(np.quantile(m["score"], OUTLIER_QUANTILE))
    out = m["score"] + bias > 0
    w_d = base.dirichlet_threshold[0]
    margin = (m["nll"] - w_d * m["nll_avg"])[out] if out.sum() >= 10 else m["nll"] - w_d * m["nll_avg"]
    b_d = float(np.quantile(margin, DIRICHLET_QUANTILE))
    return dataclasses.replace(base, outlier_bias=round(bias, 4), dirichlet_threshold=(w_d, round(b_d, 4)))


def _shares(codes: np.ndarray) -> dict[str, float]:
    return {s: round(float((codes == i).mean()), 4) for i, s in enumerate(DSLIDER_REGIMES)}


def calibrate_dslider(lm, prompts: Sequence[str], max_tokens: int = 64, batch_size: int = 64,
                      base: DSliderConfig | None = None, progress: bool = False, policy: str = "onpolicy",
                      target: float = TARGET, seed: int = 0) -> tuple[DSliderConfig, dict[str, Any]]:
    """A DSlider profile for lm: base (default: the spec's defaults) with its two biases calibrated on
    the greedy text, then (policy "onpolicy") the outlier bias raised until DSlider's own samples
    keep to the target (dslider_onpolicy.py)."""
    if policy not in POLICIES:
        raise EntropixError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not 0 < target < 1:  # before the probe's decode
        raise EntropixError(f"--target must be a share between 0 and 1, got {target}")
    base = base or DSliderConfig()
    m = collect_dslider(lm, prompts, base, max_tokens, batch_size, progress)
    if m["score"].size < 20:
        raise EntropixError(f"calibration produced only {m['score'].size} tokens; give more prompts or --max-tokens")
    cfg = dslider_thresholds(base, m)
    stats = {
        "model": lm.name, "prompts": len(prompts), "tokens": int(m["score"].size), "max_tokens": max_tokens,
        "decoding": "greedy (a DSlider probe forced to argmax), chat template",
        "quantiles": {"outlier_bias": f"-(outlier score q{OUTLIER_QUANTILE:g})",
                      "dirichlet_threshold": f"bias: (nll - w * running nll) q{DIRICHLET_QUANTILE:g} among outliers"},
        "metric_quantiles": {k: {f"q{q:g}": round(float(np.quantile(v, q)), 4) for q in QS} for k, v in m.items()},
        "regime_shares": _shares(branch_codes(cfg, m)),
        "regime_shares_base": _shares(branch_codes(base, m)),
    }
    if policy == "greedy":
        return cfg, stats
    # The probe's score spread sets stage 2's first step: on-policy scores move on that scale. Stage 1
    # ends where every token of the greedy text would take "dirichlet" over "ood".
    step = float(np.quantile(m["score"], OUTLIER_QUANTILE) - np.quantile(m["score"], 0.5))
    top = float(np.max(m["nll"] - cfg.dirichlet_threshold[0] * m["nll_avg"])) + 1.0
    cfg, on = calibrate_onpolicy(lm, prompts, cfg, max(step, 1e-3), max(top, cfg.dirichlet_threshold[1]),
                                 max_tokens, batch_size, target, seed, progress=progress)
    stats["decoding"] += "; then the biases moved on DSlider's own samples (see on_policy)"
    stats["regime_shares_greedy_text"] = _shares(branch_codes(cfg, m))
    return cfg, {**stats, "on_policy": on}


def calibrate_lookahead(lm, prompts: Sequence[str], max_tokens: int = 64, batch_size: int = 64,
                        base: Lookahead | None = None, progress: bool = False) -> tuple[Lookahead, dict[str, Any]]:
    """base (default: the catalogue's lookahead) with min_entropy from the greedy text's entropy."""
    base = base or Lookahead()
    H = collect_metrics(lm, prompts, max_tokens, batch_size, (), progress)["entropy"]
    if H.size < 20:
        raise EntropixError(f"calibration produced only {H.size} tokens; give more prompts or --max-tokens")
    cut = round(float(np.quantile(H, LOOKAHEAD_QUANTILE)), 4)
    cfg = dataclasses.replace(base, min_entropy=cut)
    stats = {"model": lm.name, "prompts": len(prompts), "tokens": int(H.size), "max_tokens": max_tokens,
             "decoding": "greedy, chat template", "quantiles": {"min_entropy": f"entropy (bits) q{LOOKAHEAD_QUANTILE:g}"},
             "metric_quantiles": {"entropy": {f"q{q:g}": round(float(np.quantile(H, q)), 4) for q in QS}},
             "search_share": round(float((H >= cut).mean()), 4),
             "search_share_base": round(float((H >= base.min_entropy).mean()), 4)}
    return cfg, stats

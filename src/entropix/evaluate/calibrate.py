"""Calibration: entropix thresholds from quantiles of a model's own metrics.

`entropix calibrate` greedily decodes a prompt set shipped with the package (or yours)
and sets each threshold from a quantile of the per-token entropy or varentropy.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import EntropixError
from ..sampler.config import SamplerConfig
from ..decode.records import Request
from ..sampler.policy import ENTROPIX_REGIMES, Greedy, entropix_regimes

PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "calibration_prompts.jsonl"

# Which quantile of the calibration metrics gives each threshold (see thresholds_from_metrics).
CALIBRATION_QUANTILES = {
    "low_ent": ("entropy", 0.30),
    "low_vent": ("varentropy", 0.30),
    "med_ent": ("entropy", 0.70),
    "high_ent": ("entropy", 0.90),
    "high_vent": ("varentropy", 0.80),
    "med_vent": ("varentropy | entropy >= high_ent", 0.25),
}


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a JSON-lines file ({"prompt": ...} per line) or a plain text file (one per line)."""
    p = Path(path) if path is not None else PROMPTS_PATH
    if not p.is_file():
        raise EntropixError(f"prompt file {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EntropixError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise EntropixError(f"{p}:{n}: expected an object with a string 'prompt'")
            line = obj["prompt"]
        out.append(line)
    if not out:
        raise EntropixError(f"prompt file {p} holds no prompts")
    return out


def _quantile(x: np.ndarray, q: float) -> float:
    return float(np.quantile(x, q)) if x.size else 0.0


def thresholds_from_metrics(H: np.ndarray, V: np.ndarray) -> dict[str, float]:
    """Thresholds from quantiles of per-token entropy H and varentropy V:

    low_ent  = 30th percentile of H    low_vent  = 30th percentile of V   (flowing box)
    med_ent  = 70th percentile of H    (branch below, resample above, among high-V tokens)
    high_ent = 90th percentile of H    high_vent = 80th percentile of V
    med_vent = 25th percentile of V among the tokens with H >= high_ent (the flattest quarter of
               the most uncertain tokens treads carefully; H and V are strongly correlated, so a
               marginal quantile would make treading unreachable)
    """
    t = {name: _quantile(H if metric == "entropy" else V, q)
         for name, (metric, q) in CALIBRATION_QUANTILES.items() if name != "med_vent"}
    hi = V[H >= t["high_ent"]]
    mv = _quantile(hi, CALIBRATION_QUANTILES["med_vent"][1]) if hi.size else t["low_vent"]
    t["med_vent"] = max(mv, t["low_vent"])
    t["med_ent"] = min(max(t["med_ent"], t["low_ent"]), t["high_ent"])
    return {k: round(v, 4) for k, v in t.items()}


def collect_metrics(lm, prompts: Sequence[str], max_tokens: int = 64, batch_size: int = 64,
                    layers: tuple[int, ...] = (-1,), progress: bool = False) -> dict[str, np.ndarray]:
    """Greedy-decode every prompt (chat template, batched) and return per-token metrics [N]."""
    if max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise EntropixError(f"--batch-size must be at least 1, got {batch_size}")
    probe = Greedy(capture=True)
    cols: dict[str, list[float]] = {}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        eng = lm.engine(layers)
        eng.add([Request(lm.tokenizer.encode_chat([{"role": "user", "content": p}]), probe, max_tokens=max_tokens,
                         stop_ids=lm.tokenizer.stop_ids, top_logprobs=1) for p in chunk])
        while eng.active:
            for r in eng.step():
                cols.setdefault("entropy", []).append(r.entropy)
                cols.setdefault("varentropy", []).append(r.varentropy)
                for k, v in (r.attn or {}).items():
                    cols.setdefault(k, []).append(v)
        if progress:
            print(f"calibrate: {min(start + batch_size, len(prompts))}/{len(prompts)} prompts, "
                  f"{len(cols.get('entropy', []))} tokens", file=sys.stderr, flush=True)
    return {k: np.array(v, dtype=np.float64) for k, v in cols.items()}


def calibrate(lm, prompts: Sequence[str] | None = None, max_tokens: int = 64, batch_size: int = 64,
              base: SamplerConfig | None = None, progress: bool = False) -> tuple[SamplerConfig, dict[str, Any]]:
    """A profile for lm: base settings with thresholds from this model's own metrics."""
    prompts = list(prompts) if prompts is not None else load_prompts()
    base = base or SamplerConfig()
    m = collect_metrics(lm, prompts, max_tokens, batch_size, base.attention_layers, progress)
    H, V = m["entropy"], m["varentropy"]
    if H.size < 20:
        raise EntropixError(f"calibration produced only {H.size} tokens; give more prompts or --max-tokens")
    cfg = dataclasses.replace(base, model=lm.name, **thresholds_from_metrics(H, V))
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    code = entropix_regimes(cfg, H, V)
    stats = {
        "prompts": len(prompts), "tokens": int(H.size), "max_tokens": max_tokens, "decoding": "greedy, chat template",
        "quantiles": {name: f"{metric} q{q:g}" for name, (metric, q) in CALIBRATION_QUANTILES.items()},
        "metric_quantiles": {k: {f"q{q:g}": round(_quantile(v, q), 4) for q in qs} for k, v in m.items()},
        "regime_shares": {s: round(float((code == i).mean()), 4) for i, s in enumerate(ENTROPIX_REGIMES) if s != "pause"},
    }
    return cfg, stats

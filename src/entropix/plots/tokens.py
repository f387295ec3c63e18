"""A PNG of a run's per-token uncertainty (`entropix plot`).

Top: the (entropy, varentropy) plane with the profile's thresholds, each regime's region
shaded and labelled, and every token as a dot coloured by the regime that chose it.
Bottom: entropy and varentropy along the generated text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import EntropixError
from ..sampler.config import SamplerConfig
from ..sampler.policy import ENTROPIX_REGIMES as REGIMES

REGIME_COLOURS = {  # matplotlib colours, close to the terminal's
    "flowing": "#8d99ae", "treading": "#f4a261", "pause": "#e9c46a", "branch": "#00b4d8",
    "resample": "#e63946", "adaptive": "#2a9d8f",
}
OTHER_COLOUR = "#555555"


def read_run(path: str | Path) -> dict[str, Any]:
    """The JSON of `entropix generate --json`, checked to hold per-token metrics."""
    p = Path(path)
    if not p.is_file():
        raise EntropixError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    try:
        run = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise EntropixError(f"{p} is not valid JSON{where}; make it with `entropix generate --json`") from None
    recs = run.get("records") if isinstance(run, dict) else None
    if not isinstance(recs, list) or not recs:
        raise EntropixError(f"{p} has no per-token records; make it with `entropix generate --json`")
    for i, r in enumerate(recs):
        ok = isinstance(r, dict) and all(
            isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])
            for k in ("entropy", "varentropy"))
        if not ok:
            raise EntropixError(f"{p}: record {i} lacks a numeric entropy and varentropy")
    return run


def regions(cfg: SamplerConfig, x_max: float, y_max: float) -> dict[str, list[tuple[float, float, float, float]]]:
    """Rectangles (x0, y0, x1, y1) of each regime's region, per EntropixSampler.plan."""
    return {
        "flowing": [(0.0, 0.0, cfg.low_ent, cfg.low_vent)],
        "treading": [(cfg.high_ent, 0.0, x_max, cfg.med_vent)],
        "branch": [(0.0, cfg.high_vent, cfg.med_ent, y_max)],
        # treading comes first where med_vent > high_vent
        "resample": [(cfg.med_ent, cfg.high_vent, cfg.high_ent, y_max),
                     (cfg.high_ent, max(cfg.high_vent, cfg.med_vent), x_max, y_max)],
    }


def plot_run(run: dict[str, Any], cfg: SamplerConfig, out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    recs = run["records"]
    H = [float(r["entropy"]) for r in recs]
    V = [float(r["varentropy"]) for r in recs]
    S = [str(r.get("regime", r.get("state", "?"))) for r in recs]  # "state": runs saved before the rename
    x_max = max(max(H), cfg.high_ent) * 1.15 + 0.1
    y_max = max(max(V), cfg.high_vent, cfg.med_vent) * 1.15 + 0.1

    fig, (ax, tl) = plt.subplots(2, 1, figsize=(10, 10), gridspec_kw={"height_ratios": [3, 2]})
    _draw_plane(ax, cfg, H, V, S, x_max, y_max)
    prof = cfg.model or "uncalibrated defaults"
    ax.set_title(title or f"{run.get('model', '?')} · sampler {run.get('sampler', '?')} · thresholds: {prof}", fontsize=10)
    _draw_timeline(tl, H, V, S, str(run.get("prompt", "")))
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, dpi=110, format="png")
    except OSError as e:
        raise EntropixError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out


def _draw_plane(ax, cfg: SamplerConfig, H: list[float], V: list[float], S: list[str], x_max: float,
                y_max: float) -> None:
    """The (entropy, varentropy) plane: each region shaded and named, thresholds, tokens as dots."""
    from matplotlib.patches import Rectangle

    for name, rects in regions(cfg, x_max, y_max).items():
        for x0, y0, x1, y1 in rects:
            if x1 > x0 and y1 > y0:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color=REGIME_COLOURS[name], alpha=0.12, lw=0))
        x0, y0, x1, y1 = max(rects, key=lambda r: (r[2] - r[0]) * (r[3] - r[1]))  # label the largest part
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, name, ha="center", va="center", fontsize=9,
                color=REGIME_COLOURS[name], alpha=0.9, weight="bold")
    ax.text(0.5 * (cfg.low_ent + cfg.high_ent), 0.5 * (cfg.low_vent + cfg.high_vent), "adaptive",
            ha="center", va="center", fontsize=9, color=REGIME_COLOURS["adaptive"], alpha=0.9, weight="bold")
    for v, lab in ((cfg.low_ent, "low_ent"), (cfg.med_ent, "med_ent"), (cfg.high_ent, "high_ent")):
        ax.axvline(v, color="#444", ls="--", lw=0.8)
        ax.text(v, y_max, f" {lab} {v:.3g}", rotation=90, va="top", ha="left", fontsize=7, color="#444")
    for v, lab in ((cfg.low_vent, "low_vent"), (cfg.med_vent, "med_vent"), (cfg.high_vent, "high_vent")):
        ax.axhline(v, color="#444", ls=":", lw=0.8)
        ax.text(x_max, v, f"{lab} {v:.3g} ", va="bottom", ha="right", fontsize=7, color="#444")
    seen = [s for s in REGIMES if s in S] + sorted({s for s in S if s not in REGIMES})
    for s in seen:
        xs = [h for h, st in zip(H, S) if st == s]
        ys = [v for v, st in zip(V, S) if st == s]
        ax.scatter(xs, ys, s=22, color=REGIME_COLOURS.get(s, OTHER_COLOUR), edgecolor="white", lw=0.4,
                   label=f"{s} ({len(xs)})", zorder=3)
    ax.set_xlim(0, x_max)
    ax.set_ylim(0, y_max)
    ax.set_xlabel("entropy (bits)")
    ax.set_ylabel("varentropy (bits²)")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)


def _draw_timeline(tl, H: list[float], V: list[float], S: list[str], prompt: str) -> None:
    """Entropy and varentropy along the generated text."""
    idx = list(range(len(H)))
    tl.plot(idx, H, color="#264653", lw=1.2, label="entropy (bits)")
    tl.scatter(idx, H, s=14, c=[REGIME_COLOURS.get(s, OTHER_COLOUR) for s in S], zorder=3)
    tl.set_xlabel("token")
    tl.set_ylabel("entropy (bits)")
    tl2 = tl.twinx()
    tl2.plot(idx, V, color="#e76f51", lw=1.0, alpha=0.8, label="varentropy (bits²)")
    tl2.set_ylabel("varentropy (bits²)")
    lines = tl.get_lines() + tl2.get_lines()
    tl.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    tl.set_title(f"per token: {prompt[:90]}{'…' if len(prompt) > 90 else ''}", fontsize=9)
    tl.set_xlim(-0.5, max(len(H) - 0.5, 0.5))

"""The compute-accuracy picture: per task, each sampler's accuracy (Wilson 95% interval)
against the tokens it generated per problem, on a log axis.

A sampler pays for its compute where its point sits above greedy's line; the Pareto
front (the best accuracy seen for at most that many tokens) shows which samplers are
worth their cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

__all__ = ["ComputePoint", "compute_points", "pareto_front", "draw_compute_plot"]


class Summary(Protocol):  # what evaluate.report's summaries offer
    n: int
    correct: int
    accuracy: float
    ci: tuple[float, float]
    tokens_per_problem: float | None


@dataclass(frozen=True)
class ComputePoint:
    """One sampler on one task."""

    sampler: str
    tokens: float  # generated tokens per problem
    accuracy: float
    low: float  # Wilson 95% interval
    high: float
    n: int


def compute_points(summary: Mapping[str, Mapping[str, Summary]],
                   order: Sequence[str] | None = None) -> dict[str, list[ComputePoint]]:
    """task -> its samplers' points (in `order`, else the summary's), for the samplers that
    ran problems and recorded tokens; tasks without any point are left out."""
    out: dict[str, list[ComputePoint]] = {}
    for task in sorted(summary):
        names = [s for s in (order or summary[task]) if s in summary[task]]
        pts = []
        for name in names:
            s = summary[task][name]
            tpp = s.tokens_per_problem
            if s.n == 0 or tpp is None or not math.isfinite(tpp) or tpp <= 0:
                continue  # a log axis has no place for 0 tokens
            lo, hi = s.ci
            pts.append(ComputePoint(name, float(tpp), s.correct / s.n, lo, hi, s.n))
        if pts:
            out[task] = pts
    return out


def pareto_front(points: Sequence[ComputePoint]) -> list[ComputePoint]:
    """The points no other point beats on both counts (fewer or equal tokens and higher
    accuracy, or equal accuracy for fewer tokens), by tokens ascending."""
    front: list[ComputePoint] = []
    for p in sorted(points, key=lambda p: (p.tokens, -p.accuracy)):
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


def _label(p: ComputePoint, pts: Sequence[ComputePoint]) -> str:
    return p.sampler if p.n >= max(q.n for q in pts) else f"{p.sampler} (n={p.n})"


# Label offsets (points) tried in turn until a label clears the ones already placed.
_OFFSETS = [(6, 4), (6, -11), (6, 13), (6, -20), (-6, 4), (-6, -11), (6, 22), (6, -29), (-6, 13), (-6, -20)]


def _place_labels(ax, pts: Sequence[ComputePoint], colours: Mapping[str, str]) -> None:
    """Annotate each point with its sampler, nudging labels off each other."""
    placed: list[tuple[float, float, float, float]] = []  # display-space boxes
    scale = ax.figure.dpi / 72.0
    for p in sorted(pts, key=lambda p: (p.tokens, -p.accuracy)):
        text = _label(p, pts)
        w, h = (4.3 * len(text) + 2) * scale, 9 * scale  # about the size of 7-pt text
        x0, y0 = ax.transData.transform((p.tokens, p.accuracy))
        for dx, dy in _OFFSETS:
            bx = x0 + dx * scale if dx > 0 else x0 + dx * scale - w
            by = y0 + dy * scale
            box = (bx, by, bx + w, by + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        colour = colours.get(p.sampler, "#555")
        far = abs(dy) > 13 or dx < 0  # a thin leader line ties a displaced label to its point
        ax.annotate(text, (p.tokens, p.accuracy), textcoords="offset points", xytext=(dx, dy),
                    ha="left" if dx > 0 else "right", fontsize=7, color=colour,
                    arrowprops=dict(arrowstyle="-", lw=0.4, color=colour, shrinkA=0, shrinkB=3) if far else None)


def _draw_task(ax, task: str, pts: list[ComputePoint], colours: Mapping[str, str], baseline: str) -> None:
    front = pareto_front(pts)
    ax.plot([p.tokens for p in front], [p.accuracy for p in front], color="#999", lw=1, ls="--", zorder=1)
    base = next((p for p in pts if p.sampler == baseline), None)
    if base is not None:
        ax.axhline(base.accuracy, color="#bbb", lw=0.8, ls=":", zorder=0)
    for p in pts:
        ax.errorbar(p.tokens, p.accuracy, yerr=[[p.accuracy - p.low], [p.high - p.accuracy]], fmt="o",
                    color=colours.get(p.sampler, "#555"), capsize=3, ms=5, zorder=3)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    # Ticks at 1-2-5 steps written plainly ("50", "200"), whatever range the panel spans.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = min(p.tokens for p in pts), max(p.tokens for p in pts)
    ax.set_xlim(lo / 2.0, hi * 3.0)  # room for the labels on either side
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(task, fontsize=10)
    ax.set_xlabel("generated tokens per problem (log)", fontsize=8)
    ax.set_ylabel("accuracy (95% Wilson CI)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.25)


def draw_compute_plot(points: Mapping[str, Sequence[ComputePoint]], png: str | Path,
                      colours: Mapping[str, str] | None = None, baseline: str = "greedy") -> Path:
    """Draw one panel per task into png (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("no points to draw (no task has a sampler with tokens recorded)")
    tasks = list(points)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows + 0.5))
    FigureCanvasAgg(fig)
    for k, task in enumerate(tasks):
        _draw_task(fig.add_subplot(rows, cols, k + 1), task, list(points[task]), colours or {}, baseline)
    fig.suptitle(f"Accuracy vs compute per task (dotted: {baseline}; dashed: Pareto front)", fontsize=10)
    fig.tight_layout()
    # Labels last: their overlap test needs the axes' final size.
    for ax, task in zip(fig.axes, tasks):
        _place_labels(ax, list(points[task]), colours or {})
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, format="png")
    return png

"""The evaluation report's charts: accuracy by task and sampler, and accuracy against tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .compute import Summary


def _figure(size: tuple[float, float]):
    # Figure + the Agg canvas directly: no pyplot, so no global backend switch and no
    # display needed, whatever else the process has set up.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def accuracy_charts(summary: Mapping[str, Mapping[str, Summary]], out_md: Path,
                    samplers: Sequence[str]) -> list[Path]:
    """Accuracy bars (with CIs) and accuracy vs tokens/problem, as PNGs next to out_md."""
    tasks = sorted(summary)
    color = {s: f"C{i % 10}" for i, s in enumerate(samplers)}
    acc_png = out_md.with_name(f"{out_md.stem}_accuracy.png")
    tok_png = out_md.with_name(f"{out_md.stem}_tokens.png")
    accuracy_bars(summary, tasks, samplers, color, acc_png)
    accuracy_vs_tokens(summary, tasks, samplers, color, tok_png)
    return [acc_png, tok_png]


def accuracy_bars(summary: Mapping[str, Mapping[str, Summary]], tasks: Sequence[str], samplers: Sequence[str],
                  color: Mapping[str, str], png: Path) -> None:
    fig, ax = _figure((max(6.0, 3.0 + 0.5 * len(tasks) * max(1, len(samplers))), 4.5))
    width = 0.8 / max(1, len(samplers))
    for j, sampler in enumerate(samplers):
        xs, ys, lo_err, hi_err = [], [], [], []
        for i, task in enumerate(tasks):
            s = summary[task].get(sampler)
            if s is None or s.n == 0:
                continue
            lo, hi = s.ci
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(s.accuracy)
            lo_err.append(s.accuracy - lo)
            hi_err.append(hi - s.accuracy)
        if xs:
            ax.bar(xs, ys, width=width, color=color[sampler], label=sampler, yerr=[lo_err, hi_err], capsize=3)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_title("Accuracy by task and sampler")
    # Outside the axes: bars near 100% would hide under it.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def accuracy_vs_tokens(summary: Mapping[str, Mapping[str, Summary]], tasks: Sequence[str],
                       samplers: Sequence[str], color: Mapping[str, str], png: Path) -> None:
    fig, ax = _figure((6.5, 4.5))
    markers = "osD^vP*Xh<>"
    for sampler in samplers:
        first = True
        for i, task in enumerate(tasks):
            s = summary[task].get(sampler)
            if s is None or s.n == 0 or s.tokens_per_problem is None:
                continue
            lo, hi = s.ci
            ax.errorbar(s.tokens_per_problem, s.accuracy, yerr=[[s.accuracy - lo], [hi - s.accuracy]],
                        fmt=markers[i % len(markers)], color=color[sampler], capsize=3,
                        label=sampler if first else None)
            ax.annotate(task, (s.tokens_per_problem, s.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=7)
            first = False
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Accuracy vs tokens per problem")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=110)

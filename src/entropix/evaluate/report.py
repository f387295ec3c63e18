"""Markdown + PNG reports from evaluation result files (JSONL, one row per problem run)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from entropix import EntropixError
from entropix.plots.compute import ComputePoint, compute_points, draw_compute_plot
from entropix.plots.report import accuracy_charts
from entropix.evaluate.jsonl import json_objects
from entropix.evaluate.stats import mcnemar_exact, paired_counts, wilson_interval

__all__ = ["ReportError", "load_results", "build_report", "compute_plot_data", "eval_report", "main"]

REQUIRED = ("id", "task", "sampler", "correct")
BASELINE = "greedy"


class ReportError(EntropixError, ValueError):
    """Unreadable or missing results (one-line message)."""


# ------------------------------------------------------------------------------ loading


def load_results(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """Rows from one or more results JSONL files, in file order.

    A last line that is not valid JSON is taken to be a run still writing (or killed
    mid-write) and skipped with a warning; bad JSON anywhere else is an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[dict] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ReportError(f"results file not found: {path}")
        for where, _, row in json_objects(path, ReportError, partial_last=True):
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ReportError(f"{where}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- summaries


def _truthy(v: object) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes", "y")
    return bool(v)


def _number(v: object) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class _Summary:
    by_id: dict[str, bool] = field(default_factory=dict)
    tokens: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.by_id)

    @property
    def correct(self) -> int:
        return sum(self.by_id.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    @property
    def tokens_per_problem(self) -> float | None:
        return sum(self.tokens) / len(self.tokens) if self.tokens else None


def _summarise(rows: list[dict]) -> tuple[dict[str, dict[str, _Summary]], int]:
    """task -> sampler -> summary, and how many duplicate rows were dropped."""
    latest: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        # A resumed run may repeat a problem; the last row for it wins.
        latest[(str(row["task"]), str(row["sampler"]), str(row["id"]))] = row
    out: dict[str, dict[str, _Summary]] = {}
    for (task, sampler, pid), row in latest.items():
        s = out.setdefault(task, {}).setdefault(sampler, _Summary())
        s.by_id[pid] = _truthy(row["correct"])
        if (t := _number(row.get("tokens"))) is not None:
            s.tokens.append(t)
        if (sec := _number(row.get("seconds"))) is not None:
            s.seconds += sec
    return out, len(rows) - len(latest)


def _sampler_order(samplers: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(samplers))
    return ([BASELINE] if BASELINE in names else []) + [s for s in names if s != BASELINE]


# ---------------------------------------------------------------------------- rendering


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{seconds:.1f} s ({s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d})"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mcnemar_cell(s: _Summary, base: _Summary | None, sampler: str) -> str:
    if sampler == BASELINE:
        return "—"
    if base is None:
        return "n/a (no greedy run)"
    _, b, c, _ = paired_counts(s.by_id, base.by_id)
    shared = len(s.by_id.keys() & base.by_id.keys())
    if shared == 0:
        return "n/a (no shared problems)"
    cell = f"{b}, {c}, {mcnemar_exact(b, c):.3g}"
    return cell if shared == s.n == base.n else f"{cell} (on {shared} shared)"


def _task_table(samplers: dict[str, _Summary]) -> list[str]:
    lines = [
        "| sampler | n | correct | accuracy | 95% CI | tokens/problem | seconds total | McNemar vs greedy (b, c, p) |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    base = samplers.get(BASELINE)
    for name in _sampler_order(samplers):
        s = samplers[name]
        lo, hi = s.ci
        tpp = s.tokens_per_problem
        lines.append(
            f"| {_cell(name)} | {s.n} | {s.correct} | {_pct(s.accuracy)} | {_pct(lo)} – {_pct(hi)} | "
            f"{'—' if tpp is None else f'{tpp:.1f}'} | {s.seconds:.1f} | {_mcnemar_cell(s, base, name)} |"
        )
    return lines


def compute_plot_data(rows: list[dict]) -> dict[str, list[ComputePoint]]:
    """What the compute-accuracy picture draws: task -> one point per sampler (greedy first)."""
    summary, _ = _summarise(rows)
    return compute_points(summary, _sampler_order(s for t in sorted(summary) for s in summary[t]))


def _compute_chart(summary: dict[str, dict[str, _Summary]], png: Path) -> Path | None:
    samplers = _sampler_order(s for t in sorted(summary) for s in summary[t])
    points = compute_points(summary, samplers)
    if not points:
        return None
    # The same colour per sampler as in the other charts.
    return draw_compute_plot(points, png, {s: f"C{i % 10}" for i, s in enumerate(samplers)}, BASELINE)


def _link(png: Path, out_md: Path) -> str:
    return Path(os.path.relpath(png.resolve(), out_md.resolve().parent)).as_posix()


def build_report(rows: list[dict], out_md: str | Path, title: str = "Evaluation report",
                 compute_plot: str | Path | None = None) -> str:
    """Write a markdown report (per-task tables, charts, notes) to out_md and return its text.

    compute_plot: where the per-task accuracy-vs-tokens PNG goes (default: next to out_md,
    as <stem>_compute.png); the markdown links it either way."""
    if not rows:
        raise ReportError("no results to report")
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    summary, duplicates = _summarise(rows)
    samplers = _sampler_order(s for t in sorted(summary) for s in summary[t])
    compute_png = Path(compute_plot) if compute_plot else out_md.with_name(f"{out_md.stem}_compute.png")
    if compute_png.suffix.lower() != ".png":
        raise ReportError(f"the compute plot must be a .png file, got {compute_png}")

    md = [f"# {title}", ""]
    md.append(f"{len(rows) - duplicates} results over {len(summary)} task(s); samplers: {', '.join(samplers)}.")
    md.append("")
    for task in sorted(summary):
        md += [f"## {task}", ""] + _task_table(summary[task]) + [""]

    try:
        charts = accuracy_charts(summary, out_md, _sampler_order(s for t in sorted(summary) for s in summary[t]))
        compute = _compute_chart(summary, compute_png)
    except ImportError:  # matplotlib is an optional extra
        charts, compute = [], None
    except OSError as e:
        raise ReportError(f"cannot write the charts: {e.strerror or e}") from None
    if charts:
        md += ["## Charts", ""]
        captions = ["Accuracy by task and sampler", "Accuracy vs tokens per problem"]
        for caption, png in zip(captions, charts):
            md += [f"![{caption}]({png.name})", ""]  # same folder as the markdown
        if compute is not None:
            md += [f"![Accuracy vs tokens per problem, per task]({_link(compute, out_md)})", ""]

    total = sum(s.seconds for t in summary.values() for s in t.values())
    md += ["## Notes", ""]
    md.append(f"- Total run time (sum of per-problem seconds): {_duration(total)}.")
    md.append("- 95% CI: Wilson score interval on accuracy.")
    md.append(
        f"- McNemar vs {BASELINE}: exact two-sided binomial test on the problems both samplers ran; "
        f"b = this sampler right and {BASELINE} wrong, c = {BASELINE} right and this sampler wrong."
    )
    if duplicates:
        md.append(f"- {duplicates} repeated row(s) for the same task, sampler and problem id: the last one was kept.")
    if not charts:
        md.append("- Charts skipped: matplotlib is not installed.")
    text = "\n".join(md) + "\n"
    out_md.write_text(text, encoding="utf-8")
    return text


def eval_report(paths: str | Path | Iterable[str | Path], out_md: str | Path, title: str = "Evaluation report",
                preamble: str | None = None, compute_plot: str | Path | None = None) -> str:
    """Load result files and write the report (a preamble goes after the title); returns the markdown."""
    text = build_report(load_results(paths), out_md, title=title, compute_plot=compute_plot)
    if preamble:
        head, _, rest = text.partition("\n\n")
        text = f"{head}\n\n{preamble.strip()}\n\n{rest}"
        Path(out_md).write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m entropix.evaluate.report results.jsonl [...] -o report.md"""
    ap = argparse.ArgumentParser(prog="python -m entropix.evaluate.report", description=__doc__)
    ap.add_argument("results", nargs="+", help="results JSONL file(s)")
    ap.add_argument("-o", "--out", default="report.md", help="markdown file to write (charts go next to it)")
    ap.add_argument("--title", default="Evaluation report")
    ap.add_argument("--compute-plot", default=None, help="PNG of accuracy vs tokens per task (default: OUT_compute.png)")
    args = ap.parse_args(argv)
    try:
        eval_report(args.results, args.out, title=args.title, compute_plot=args.compute_plot)
    except EntropixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

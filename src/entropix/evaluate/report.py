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
from entropix.evaluate.baselines import Baseline, RowStats, Tally, best_baseline, row_stats
from entropix.evaluate.jsonl import json_objects
from entropix.evaluate.stats import holm, mcnemar_exact, paired_counts, wilson_interval

__all__ = ["ReportError", "load_results", "build_report", "compute_plot_data", "eval_report", "main"]

REQUIRED = ("id", "task", "sampler", "correct")
BASELINE = "greedy"
# Greedy rows that hit the token cap this often make a comparison with greedy a test of the cap.
FAIR_TRUNCATION = 0.10


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
class _Summary(Tally):
    by_id: dict[str, bool] = field(default_factory=dict)
    tokens: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rows: dict[str, dict] = field(default_factory=dict)

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    @property
    def tokens_per_problem(self) -> float | None:
        return sum(self.tokens) / len(self.tokens) if self.tokens else None

    @property
    def stats(self) -> RowStats:
        return row_stats(self.rows.values())


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
        s.rows[pid] = row
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


@dataclass
class _Test:
    """One sampler against greedy on one task: McNemar counts, p, and Holm's adjusted p."""

    b: int
    c: int
    p: float
    shared: int
    holm: float = 1.0


def _mcnemar(s: _Summary, base: _Summary | None) -> _Test | None:
    if base is None or not (shared := len(s.by_id.keys() & base.by_id.keys())):
        return None
    _, b, c, _ = paired_counts(s.by_id, base.by_id)
    return _Test(b, c, mcnemar_exact(b, c), shared)


def _tests(summary: dict[str, dict[str, _Summary]]) -> dict[tuple[str, str], _Test]:
    """Every comparison with greedy, Holm-corrected per sampler over the tasks of the report."""
    tests: dict[tuple[str, str], _Test] = {}
    for task, samplers in summary.items():
        for name, s in samplers.items():
            if name != BASELINE and (t := _mcnemar(s, samplers.get(BASELINE))) is not None:
                tests[(task, name)] = t
    for sampler in {name for _, name in tests}:
        family = [key for key in tests if key[1] == sampler]
        for key, adjusted in zip(family, holm([tests[key].p for key in family])):
            tests[key].holm = adjusted
    return tests


def _floor(samplers: dict[str, _Summary]) -> Baseline | None:
    """The best trivial rule over every problem of the task that any sampler ran."""
    problems = {pid: (r.get("prompt"), r["expected"])
                for s in samplers.values() for pid, r in s.rows.items() if "expected" in r}
    return best_baseline(problems)


def _unfair(samplers: dict[str, _Summary]) -> bool:
    g = samplers.get(BASELINE)
    return g is not None and g.n > 0 and (g.stats.truncated or 0) >= FAIR_TRUNCATION * g.n


def _count(k: int | None, n: int) -> str:
    return "—" if k is None or n == 0 else f"{k} ({_pct(k / n)})"


def _acc_ci(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{_pct(k / n if n else 0.0)} ({_pct(lo)} – {_pct(hi)})"


def _mcnemar_cell(t: _Test | None, s: _Summary, base: _Summary | None, sampler: str, unfair: bool) -> str:
    if sampler == BASELINE:
        return "—"
    if base is None:
        return "n/a (no greedy run)"
    if t is None:
        return "n/a (no shared problems)"
    cell = f"{t.b}, {t.c}, {t.p:.3g}"
    cell = cell if t.shared == s.n == base.n else f"{cell} (on {t.shared} shared)"
    return f"{cell} †" if unfair else cell


def _task_table(task: str, samplers: dict[str, _Summary], tests: dict[tuple[str, str], _Test]) -> list[str]:
    lines = [
        "| sampler | n | correct | accuracy | 95% CI | tokens/problem | truncated | no answer | commonest answer "
        "| seconds total | McNemar vs greedy (b, c, p) | Holm p |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|---:|",
    ]
    if (floor := _floor(samplers)) is not None:
        lo, hi = wilson_interval(floor.correct, floor.n)
        lines.append(f"| floor: {_cell(floor.name)} | {floor.n} | {floor.correct} | {_pct(floor.accuracy)} | "
                     f"{_pct(lo)} – {_pct(hi)} | 0 | — | — | — | — | — | — |")
    base, unfair = samplers.get(BASELINE), _unfair(samplers)
    for name in _sampler_order(samplers):
        s, t, st = samplers[name], tests.get((task, name)), samplers[name].stats
        lo, hi = s.ci
        tpp = s.tokens_per_problem
        lines.append(
            f"| {_cell(name)} | {s.n} | {s.correct} | {_pct(s.accuracy)} | {_pct(lo)} – {_pct(hi)} | "
            f"{'—' if tpp is None else f'{tpp:.1f}'} | {_count(st.truncated, st.n)} | {_count(st.no_answer, st.n)} | "
            f"{_cell(st.lean or '—')} | {s.seconds:.1f} | {_mcnemar_cell(t, s, base, name, unfair)} | "
            f"{'—' if t is None else f'{t.holm:.3g}'} |"
        )
    return lines


def _unfair_line(samplers: dict[str, _Summary]) -> list[str]:
    if not _unfair(samplers):
        return []
    g = samplers[BASELINE]
    caps = sorted({str(r.get("max_tokens")) for r in g.rows.values() if r.get("max_tokens") is not None})
    cap = f" ({', '.join(caps)} tokens)" if caps else ""
    return [f"**Not a fair comparison (†)**: greedy stops at the token cap{cap} on {g.stats.truncated} of "
            f"{g.n} rows ({_pct((g.stats.truncated or 0) / g.n)}; a fair test needs under "
            f"{100 * FAIR_TRUNCATION:.0f}%), so its accuracy here is partly unfinished text.", ""]


def _verdicts(task: str, samplers: dict[str, _Summary], tests: dict[tuple[str, str], _Test]) -> str:
    out = []
    for name in _sampler_order(samplers):
        t = tests.get((task, name))
        if t is not None and t.holm < 0.05:
            out.append(f"{name} {'better' if t.b > t.c else 'worse'} ({t.holm:.2g})")
    return "; ".join(out) or "none"


def _floor_table(summary: dict[str, dict[str, _Summary]], tests: dict[tuple[str, str], _Test]) -> list[str]:
    """One row per task: the floor, greedy's truncation, and what survives Holm."""
    lines = ["| task | best trivial baseline | its accuracy (95% CI) | greedy accuracy (95% CI) | greedy truncated "
             "| greedy no answer | fair test (greedy truncated < 10%) | Holm p < 0.05 vs greedy |",
             "|---|---|---|---|---:|---:|---|---|"]
    for task in sorted(summary):
        samplers, floor, g = summary[task], _floor(summary[task]), summary[task].get(BASELINE)
        fl = ("—", "—") if floor is None else (_cell(floor.name), _acc_ci(floor.correct, floor.n))
        gs = g.stats if g is not None else None
        gcells = ("—", "—", "—") if g is None or gs is None else (
            _acc_ci(g.correct, g.n), _count(gs.truncated, gs.n), _count(gs.no_answer, gs.n))
        fair = "—" if g is None or gs is None or gs.truncated is None else ("no †" if _unfair(samplers) else "yes")
        lines.append(f"| {_cell(task)} | {fl[0]} | {fl[1]} | {' | '.join(gcells)} | {fair} | "
                     f"{_verdicts(task, samplers, tests)} |")
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


def _tables(summary: dict[str, dict[str, _Summary]]) -> list[str]:
    """The floor table, then one table per task."""
    tests = _tests(summary)
    md = ["## Against the floor", "", *_floor_table(summary, tests), ""]
    for task in sorted(summary):
        md += [f"## {task}", "", *_unfair_line(summary[task]), *_task_table(task, summary[task], tests), ""]
    return md


def _notes(summary: dict[str, dict[str, _Summary]], duplicates: int, charts: bool) -> list[str]:
    total = sum(s.seconds for t in summary.values() for s in t.values())
    return [
        "## Notes", "",
        f"- Total run time (sum of per-problem seconds): {_duration(total)}.",
        "- 95% CI: Wilson score interval on accuracy.",
        "- Floor: the best trivial rule over every problem of the task in these rows, with no model: always the "
        "commonest expected answer, or, where each question ends in two options that vary, always the first or "
        "always the second.",
        "- truncated: rows that stopped at the token cap (finish_reason \"length\"); — where the rows record no "
        "finish reason (samplers that decode several paths per problem). no answer: rows the grader found no "
        "answer in. commonest answer: the answer given most, as an option position on two-option questions.",
        f"- McNemar vs {BASELINE}: exact two-sided binomial test on the problems both samplers ran; "
        f"b = this sampler right and {BASELINE} wrong, c = {BASELINE} right and this sampler wrong.",
        f"- Holm p: McNemar p with Holm's step-down correction over each sampler's comparisons with {BASELINE} "
        "across the tasks of this report. Only Holm p < 0.05 is called significant.",
        f"- †: {BASELINE} stops at the token cap on {100 * FAIR_TRUNCATION:.0f}% or more of the task's rows, so the "
        "comparison measures the cap as much as the decoder: not a fair comparison.",
        *([f"- {duplicates} repeated row(s) for the same task, sampler and problem id: the last one was kept."]
          if duplicates else []),
        *([] if charts else ["- Charts skipped: matplotlib is not installed."]),
    ]


def build_report(rows: list[dict], out_md: str | Path, title: str = "Evaluation report",
                 compute_plot: str | Path | None = None) -> str:
    """Write a markdown report (floor table, per-task tables, charts, notes) to out_md and return its text.

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
    md += _tables(summary)

    try:
        charts = accuracy_charts(summary, out_md, samplers)
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

    md += _notes(summary, duplicates, bool(charts))
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

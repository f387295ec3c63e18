"""Fresh seed 9: pre-registered voting run (deepconf against self-consistency-16, with greedy,
DSlider and auto beside them and the trivial floors).

    python benchmarks/fresh_seed9.py budgets           # BUDGETS from the development greedy rows
    python benchmarks/fresh_seed9.py decode --part 0   # one process per part, one torch thread each
    python benchmarks/fresh_seed9.py decode --part 1
    python benchmarks/fresh_seed9.py decode --part 1 --tasks coinflip   # one task of a part: never two
                                                                        # processes on the same task
    python benchmarks/fresh_seed9.py report            # docs/results-compute-seed9/REPORT.md
    python benchmarks/fresh_seed9.py readme            # the README's summary table

Everything below was committed before any seed-9 row was decoded; rows are appended as they
finish and a rerun skips the problems already written, so the run may span sittings without
any setting changing.
- Problems: the synthetic tasks at seed 9 (never decoded before), 200 per task, TASKS.
- Mode: what `entropix eval` runs by default (the embedded GGUF, `--quant auto`: each tensor as
  stored) with `--compile`; one torch thread per process, two processes.
- Budgets: new tokens per row per task, BUDGETS: the smallest multiple of 32 at which at most
  7 of 100 development seed 1 greedy rows would be cut off (decoded with a 320-token cap; rows
  that reached it count as cut), so that greedy finishes (truncated on under 10% of rows)
  before any comparison.
- Decoders, in this order (samplers outer, tasks inner, so that the primary comparison is
  complete first): SAMPLERS with the catalogue's settings at this commit; deepconf's were chosen
  on development seed 1 (`benchmarks/deepconf_dev.py`, docs/results-compute-dev/voting/deepconf-analysis.md).
- Primary test: deepconf against self-consistency-16 per task, exact McNemar, Holm over the
  tasks; the claim holds if no task is significantly lower (Holm p < 0.05 with deepconf below)
  and deepconf spends at most 60% of self-consistency-16's tokens over all problems. Every other
  decoder against greedy per task, Holm within each comparison; all tasks reported.
- Amendment, committed after self-consistency-16's compare and decimals rows and before any row of
  the decoders below it: sc-early is dropped from SAMPLERS. It would take about half the run's CPU
  time (on development seed 1, replayed on the full self-consistency-16 traces, it stopped early on
  7 of 160 problems and spent 98% of the tokens), and it is not in the primary test. Nothing else
  changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "docs" / "results-compute-seed9"
SEED, PROBLEMS = 9, 200
TASKS = ("letters", "coinflip", "decimals", "compare")
SAMPLERS = ("greedy", "self-consistency-16", "deepconf", "dslider", "auto")  # sc-early dropped: see the amendment
BUDGETS = {"letters": 32, "coinflip": 96, "decimals": 192, "compare": 160}  # dev seed 1 greedy cut off: 1, 4, 6, 7 of 100
PARTS = (("decimals", "letters"), ("compare", "coinflip"))  # two processes, about equal work
ROWS = 64  # rows decoded together: four prompts of 16 samples
# development seed 1 greedy, 100 problems per task, 320-token cap, this mode:
#   entropix eval --task T --sampler greedy --seed 1 --limit 100 --max-tokens 320 --compile -o ...
DEV_GREEDY = REPO / "docs" / "results-compute-dev" / "voting"
MAX_CUT = 7  # of 100 development rows


def cmd_budgets(args) -> int:
    """The budget rule on the development greedy rows: the smallest multiple of 32 cutting at most MAX_CUT."""
    for task in TASKS:
        rows = [json.loads(x) for x in (DEV_GREEDY / f"{task}_greedy-320.jsonl").read_text().splitlines()]
        lengths = [r["tokens"] if r["finish_reason"] != "length" else 10**9 for r in rows]
        budget = next(b for b in range(32, 321, 32) if sum(n > b for n in lengths) <= MAX_CUT * len(rows) / 100)
        cut = sum(n > budget for n in lengths)
        print(f"{task}: {budget} tokens ({cut} of {len(rows)} development rows cut off); committed {BUDGETS[task]}")
    return 0


def _params(name: str) -> tuple[str, dict]:
    from entropix.evaluate.runner import sampler_params

    if name.startswith("self-consistency-"):
        return "self-consistency", sampler_params("self-consistency", samples=int(name.rsplit("-", 1)[1]))
    return name, sampler_params(name)


def cmd_decode(args) -> int:
    from entropix.cli.common import compile_step  # a benchmark may use the CLI's helpers
    from entropix.evaluate.runner import run_eval
    from entropix.evaluate.tasks import load_task
    from entropix.loading import load_model

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load_model(None, device="cpu", progress=False)
    compile_step(lm)
    FOLDER.mkdir(parents=True, exist_ok=True)
    for label in SAMPLERS:
        name, params = _params(label)
        for task in args.tasks or PARTS[args.part]:
            t0 = time.perf_counter()
            s = run_eval(lm, load_task(task, PROBLEMS, SEED), name, task=task, params=params, label=label,
                         out=FOLDER / f"{task}_{label}.jsonl", seed=SEED, max_tokens=BUDGETS[task],
                         batch_size=ROWS, progress=False)
            s.update(run_wall_seconds=round(time.perf_counter() - t0, 1), max_tokens=BUDGETS[task], batch=ROWS,
                     device="cpu", device_name="CPU, 1 thread (two processes on a 2-core machine)",
                     quant=getattr(lm, "quant", None), compiled=True)
            with (FOLDER / "runs.log").open("a") as fh:
                fh.write(json.dumps(s) + "\n")
            print(json.dumps(s), flush=True)
    return 0


# -- report ----------------------------------------------------------------------------------------

def _helpers():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compute_experiments

    return compute_experiments


def _paired(task: str, labels: tuple[str, ...]) -> list[list[dict]] | None:
    """Rows of each label on the problems all of them ran, in one order; None where one is missing."""
    ce = _helpers()
    paths = [FOLDER / f"{task}_{label}.jsonl" for label in labels]
    if not all(p.exists() for p in paths):
        return None
    runs = [ce._rows(p) for p in paths]
    ids = [i for i in runs[0] if all(i in r for r in runs[1:])]
    return [[r[i] for i in ids] for r in runs] if ids else None


def looping(text: str, tail: int = 80, longest: int = 32) -> bool:
    """Whether a text ends in one stretch of at most `longest` characters repeated over its last `tail`."""
    end = text[-tail:]
    return len(end) == tail and any(all(end[i] == end[i + p] for i in range(tail - p)) for p in range(1, longest + 1))


def _cap_cell(rows: list[dict]) -> str:
    """Greedy's truncated rows, and how many of them end in a repetition loop (no budget would end those)."""
    cut = [r for r in rows if r.get("finish_reason") == "length"]
    return f"{len(cut)} ({len(cut) / max(len(rows), 1):.1%}; {sum(looping(r.get('output') or '') for r in cut)} looping)"


def _spent(rows: list[dict]) -> int:
    return sum(int(r["tokens"]) for r in rows)


def primary_lines() -> list[str]:
    """deepconf against self-consistency-16, per task, with greedy's floor and cap beside them."""
    from entropix.evaluate.stats import holm, mcnemar_exact

    ce = _helpers()
    entries = []
    for task in TASKS:
        got = _paired(task, ("greedy", "self-consistency-16", "deepconf"))
        if got:
            b, c = ce._discordant([bool(r["correct"]) for r in got[2]], [bool(r["correct"]) for r in got[1]])
            entries.append((task, *got, b, c, mcnemar_exact(b, c)))
    adjusted = holm([e[-1] for e in entries])
    out = ["### deepconf against self-consistency-16 (the primary test)", "",
           "b: right only with deepconf; c: right only with self-consistency-16; exact McNemar p, Holm over the "
           "tasks of this table (only Holm p < 0.05 is called significant). Tokens: generated tokens per problem, "
           "all traces; share: deepconf's tokens over self-consistency-16's on the same problems. Greedy truncated: "
           "rows cut off by the budget, and how many of those end in one short stretch repeated (a loop no "
           "budget ends).", "",
           "| task | n | floor | greedy (95% CI) | greedy truncated | greedy no answer | SC-16 (95% CI) | SC-16 tokens "
           "| deepconf (95% CI) | deepconf tokens | share | stopped after warm-up | b, c | p | Holm p |",
           "|---|---:|---|---|---:|---:|---|---:|---|---:|---:|---:|---|---:|---:|"]
    total = [0, 0]
    for (task, greedy, sc, dc, b, c, p), hp in zip(entries, adjusted):
        _, no_answer, _ = ce._greedy_cap(greedy)
        trunc = _cap_cell(greedy)
        total[0], total[1] = total[0] + _spent(sc), total[1] + _spent(dc)
        settled = sum(0 < len(r.get("branches") or []) < 16 for r in dc)  # pruned traces stay listed
        out.append(f"| {task} | {len(greedy)} | {ce._floor_cell(greedy)} | {ce._acc_ci(greedy)} | {trunc} | "
                   f"{no_answer} | {ce._acc_ci(sc)} | {ce._tokens(sc)} | {ce._acc_ci(dc)} | {ce._tokens(dc)} | "
                   f"{_spent(dc) / max(_spent(sc), 1):.2f} | {settled} | {b}, {c} | {p:.3g} | {hp:.3g} |")
    if total[0]:
        out += ["", f"Over all tasks deepconf spent {total[1] / total[0]:.1%} of self-consistency-16's tokens."]
    return out


def others_lines() -> list[str]:
    """Every other decoder against greedy per task; Holm within each decoder, over the tasks."""
    from entropix.evaluate.stats import holm, mcnemar_exact

    ce = _helpers()
    out = ["### Every decoder against greedy", "",
           "b: right only with the decoder; c: right only with greedy; exact McNemar p; Holm p within each decoder "
           "over the tasks (only Holm p < 0.05 is called significant).", "",
           "| decoder | task | n | floor | greedy (95% CI) | decoder (95% CI) | tokens/problem | b, c | p | Holm p |",
           "|---|---|---:|---|---|---|---:|---|---:|---:|"]
    for label in SAMPLERS[1:]:
        rows = []
        for task in TASKS:
            got = _paired(task, ("greedy", label))
            if got:
                b, c = ce._discordant([bool(r["correct"]) for r in got[1]], [bool(r["correct"]) for r in got[0]])
                rows.append((task, *got, b, c, mcnemar_exact(b, c)))
        for (task, greedy, mine, b, c, p), hp in zip(rows, holm([r[-1] for r in rows])):
            out.append(f"| {label} | {task} | {len(greedy)} | {ce._floor_cell(greedy)} | {ce._acc_ci(greedy)} | "
                       f"{ce._acc_ci(mine)} | {ce._tokens(mine)} | {b}, {c} | {p:.3g} | {hp:.3g} |")
    return out


def _short_ci(rows: list[dict]) -> str:
    from entropix.evaluate.stats import wilson_interval

    k, n = sum(bool(r["correct"]) for r in rows), len(rows)
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f}% ({100 * lo:.0f}-{100 * hi:.0f})"


def readme_lines() -> list[str]:
    """The README's table: per task the floor, greedy with its cut-off and no-answer rates, then each
    decoder's accuracy, tokens per problem and Holm p against greedy (Holm within each decoder)."""
    from entropix.evaluate.stats import holm, mcnemar_exact

    ce = _helpers()
    cells: dict[str, dict[str, str]] = {task: {} for task in TASKS}
    for label in SAMPLERS[1:]:
        got = {task: _paired(task, ("greedy", label)) for task in TASKS}
        tests = {t: mcnemar_exact(*ce._discordant([bool(r["correct"]) for r in g[1]], [bool(r["correct"]) for r in g[0]]))
                 for t, g in got.items() if g}
        for (task, p), hp in zip(tests.items(), holm(list(tests.values()))):
            mine = got[task][1]
            cells[task][label] = f"{_short_ci(mine)}, {ce._tokens(mine)} tok, Holm p {hp:.2g}"
    head = "| task | floor | greedy, tokens | greedy truncated / no answer | " + " | ".join(SAMPLERS[1:]) + " |"
    out = [head, "|" + "---|" * (4 + len(SAMPLERS) - 1)]
    for task in TASKS:
        greedy = list(ce._rows(FOLDER / f"{task}_greedy.jsonl").values())
        trunc, no_answer, unfair = ce._greedy_cap(greedy)
        mark = " †" if unfair else ""
        row = [f"{task}{mark}", ce._floor_cell(greedy), f"{_short_ci(greedy)}, {ce._tokens(greedy)} tok",
               f"{trunc.split(' ')[-1].strip('()')} / {no_answer.split(' ')[-1].strip('()')}"]
        out.append("| " + " | ".join(row + [cells[task].get(label, "—") for label in SAMPLERS[1:]]) + " |")
    return out


def cmd_readme(args) -> int:
    print("\n".join(readme_lines()))
    return 0


def cmd_report(args) -> int:
    from entropix.evaluate.report import eval_report

    pre = (FOLDER / "preamble.md").read_text() if (FOLDER / "preamble.md").exists() else None
    out = FOLDER / "REPORT.md"
    text = eval_report(sorted(str(p) for p in FOLDER.glob("*.jsonl")), out, title=args.title, preamble=pre)
    out.write_text(text.rstrip() + "\n\n" + "\n".join(primary_lines() + [""] + others_lines()) + "\n")
    print(out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("budgets")
    d = sub.add_parser("decode")
    d.add_argument("--part", type=int, choices=range(len(PARTS)), required=True)
    d.add_argument("--tasks", nargs="+", choices=TASKS,
                   help="only these tasks (a part's work over more processes once the other part is done)")
    sub.add_parser("readme", help="the README's summary table")
    r = sub.add_parser("report")
    r.add_argument("--title", default="Fresh seed 9: confidence-pruned voting against self-consistency")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    return {"budgets": cmd_budgets, "decode": cmd_decode, "report": cmd_report, "readme": cmd_readme}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation set behind docs/RESULTS.md, in one process (the model loads once).

    python benchmarks/run_results.py                         # embedded model, 100 problems per task
    python benchmarks/run_results.py --device cuda --batch 640

Every run appends to <outdir>/<task>_<sampler>.jsonl and resumes where it stopped, so
rerunning only decodes what is missing. A run that fails is reported and skipped; the
report is written from whatever rows exist, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


# Rows under another label: (sampler, parameters). dslider-uncalibrated = the spec's defaults, where
# `dslider` takes the model's built-in profile (src/entropix/profiles/dslider/).
VARIANTS = {"dslider-uncalibrated": ("dslider", {"sampler_config": {}})}


def regrade(outdir: Path, args: argparse.Namespace) -> None:
    from entropix.evaluate.regrade import regrade_dir
    from entropix.evaluate.tasks import load_task

    def problems_of(task: str):
        return load_task(task, args.limit, args.seed, data=args.gsm8k if task == "gsm8k" else None)

    for name, changed in regrade_dir(outdir, problems_of).items():
        if changed:
            print(f"regraded {name}: {changed} row(s) changed", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", help="float32 keeps GPU rows comparable with CPU ones")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32, help="rows decoded together")
    ap.add_argument("--tasks", default="arithmetic,coinflip,compare,gsm8k")
    ap.add_argument("--samplers", default="greedy,self-consistency,cot,entropix,dslider,lookahead")
    ap.add_argument("--max-tokens", type=int, default=128, help="synthetic tasks")
    ap.add_argument("--gsm8k-max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gsm8k", default=str(REPO.parent / "shared" / "data" / "gsm8k_train_400.jsonl"))
    ap.add_argument("--outdir", default=str(REPO / "docs" / "results"))
    ap.add_argument("--report", default=str(REPO / "docs" / "RESULTS.md"))
    ap.add_argument("--title", default="Evaluation results", help="the report's heading")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the rows there; decode nothing")
    ap.add_argument("--regrade", action="store_true",
                    help="grade the stored rows again with the current graders first (after a grader fix)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.regrade:
        regrade(Path(args.outdir), args)
    if args.report_only:
        return write_report(Path(args.outdir), args.report, args.title)

    import torch

    from entropix.loading import load_model

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - t0
    dev = lm.model.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"loaded {lm.name} on {device_name} in {load_s:.1f}s", file=sys.stderr)
    failed = decode_all(lm, args, outdir, dict(device=str(dev), dtype=args.dtype, batch=args.batch,
                                               host=platform.node(), device_name=device_name))
    write_report(outdir, args.report, args.title)
    if failed:
        print("failed runs: " + " ".join(failed), file=sys.stderr)
        return 1
    return 0


def decode_all(lm, args: argparse.Namespace, outdir: Path, where: dict) -> list[str]:
    """Every task with every sampler; the runs that failed (the report shows what finished)."""
    from entropix.evaluate.runner import run_eval, sampler_params
    from entropix.evaluate.tasks import load_task

    failed = []
    for task in args.tasks.split(","):
        gsm = task == "gsm8k"
        problems = load_task(task, args.limit, args.seed, data=args.gsm8k if gsm else None)
        max_tokens = args.gsm8k_max_tokens if gsm else args.max_tokens
        for name in args.samplers.split(","):
            t1 = time.perf_counter()
            sampler, given = VARIANTS.get(name, (name, {}))
            try:
                s = run_eval(lm, problems, sampler, task=task, params=sampler_params(sampler, **given), label=name,
                             out=outdir / f"{task}_{name}.jsonl", seed=args.seed, max_tokens=max_tokens,
                             batch_size=args.batch, progress=sys.stderr.isatty())
            except Exception as e:  # keep going: the report shows what finished
                print(f"!! {task}/{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                failed.append(f"{task}/{name}")
                continue
            s.update(run_wall_seconds=round(time.perf_counter() - t1, 1), max_tokens=max_tokens, **where)
            with (outdir / "runs.log").open("a") as fh:
                fh.write(json.dumps(s) + "\n")
            print(json.dumps(s), file=sys.stderr, flush=True)
    return failed


def write_report(outdir: Path, report: str, title: str = "Evaluation results") -> int:
    """The report from every <outdir>/*.jsonl, with the preamble from runs.log (and notes.md)."""
    from entropix.evaluate.report import eval_report
    from results_preamble import preamble

    pre = outdir / "preamble.md"
    pre.write_text(preamble(outdir / "runs.log"))
    results = sorted(outdir.glob("*.jsonl"))
    # compute_experiments.py splices its own section into the report: keep it across rewrites.
    begin, end = "<!-- compute-experiments:begin -->", "<!-- compute-experiments:end -->"
    old = Path(report).read_text() if Path(report).is_file() else ""
    kept = old[old.index(begin):old.index(end) + len(end)] if begin in old and end in old else ""
    if results:
        text = eval_report([str(p) for p in results], report, title=title, preamble=pre.read_text())
        if kept:
            Path(report).write_text(text.rstrip() + "\n\n" + kept + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

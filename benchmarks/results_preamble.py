"""Markdown setup + timing section for docs/RESULTS.md, from run_results.py's runs.log.

Usage: python benchmarks/results_preamble.py docs/results/runs.log > docs/results/preamble.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def preamble(log: Path) -> str:
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    md = [
        "Produced by `benchmarks/run_results.py` with `entropix eval` (one JSONL row per problem, in",
        "[`docs/results/`](results/)) and `entropix eval-report`. Every sampler decodes through the same",
        "engine; prompts are the chat template with the bare question as the user message (no",
        "\"think step by step\"). Synthetic tasks are generated from seed 0; GSM8K problems are the first",
        "rows of `gsm8k_train_400.jsonl` (a development sample of the GSM8K train split).",
        "",
        "Samplers: greedy; self-consistency = majority vote over 5 samples at T=0.7; cot = CoT decoding",
        "(Wang & Zhou 2024), 10 first-token branches continued greedily, max-path by answer-token margin;",
        "entropix = entropy/varentropy-guided sampling with the model's calibrated profile; dslider = entropix v5",
        "(DSlider) with the model's calibrated profile, dslider-uncalibrated with the spec's defaults; lookahead = a",
        "small tree search (the 4 most likely tokens each rolled out 3 tokens where the entropy is >= 1 bit). `tokens/problem` counts every",
        "token decoded for a problem over all its rows (plus CoT's \"So the answer is\" follow-ups): the",
        "compute each sampler spent. `seconds total` is the decoding time charged to the problems (each",
        "batched step's time split over the rows in it), so it adds up to the run's decoding time.",
        "",
    ]
    if runs:
        latest: dict[tuple[str, str], dict] = {}
        wall: dict[tuple[str, str], float] = {}
        for r in runs:
            key = (r["task"], r["sampler"])
            latest[key] = r
            wall[key] = wall.get(key, 0.0) + float(r.get("run_wall_seconds") or 0.0)
        devices = sorted({str(r.get("device_name") or r.get("device")) for r in runs})
        md += ["## Runs", "", f"Device(s): {', '.join(devices)}; model: {runs[-1].get('model')}.", "",
               "| task | sampler | n | max tokens | batch | device | decoding s | wall s |",
               "|---|---|---:|---:|---:|---|---:|---:|"]
        for (task, sampler), r in latest.items():
            md.append(f"| {task} | {sampler} | {r['n']} | {r.get('max_tokens', '')} | {r.get('batch', '')} | "
                      f"{r.get('device_name') or r.get('device', '')} | {r['seconds']:.1f} | {wall[(task, sampler)]:.1f} |")
        total = sum(wall.values())
        md += ["", f"All runs together: {total:.0f} s wall ({_hms(total)}); a resumed run counts each of its sittings.", ""]
    notes = log.parent / "notes.md"  # hand-written remarks on the runs, kept when the report is rewritten
    if notes.is_file():
        md += [notes.read_text(encoding="utf-8").strip(), ""]
    return "\n".join(md).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(preamble(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/runs.log")))

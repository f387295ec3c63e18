"""Grade stored evaluation rows again with the current graders (after a grader fix).

Outputs are untouched; only `extracted` and `correct` change, so every sampler of a task is
scored by the same grader whatever code was current when its rows were decoded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .tasks import Problem, is_correct


def regrade_file(path: Path, problems: dict[str, Problem]) -> int:
    """Rewrite path's rows graded again; returns how many rows changed their verdict."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]
    changed = 0
    for r in rows:
        problem = problems.get(r["id"])
        if problem is None:
            raise ValueError(f"{path}: row {r['id']!r} is not one of the task's problems")
        got, ok = is_correct(problem, r["output"])
        changed += ok != bool(r["correct"])
        r["extracted"], r["correct"] = got, ok
    if changed:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return changed


def regrade_dir(folder: Path, problems_of: Callable[[str], list[Problem]]) -> dict[str, int]:
    """regrade_file for each <task>_<sampler>.jsonl in folder; {file name: rows changed}."""
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        task = path.name.split("_")[0]
        out[path.name] = regrade_file(path, {p.id: p for p in problems_of(task)})
    return out

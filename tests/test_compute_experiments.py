"""The per-seed table of benchmarks/compute_experiments.py: paired counts, exact p, pooling."""

import importlib.util
import json
from pathlib import Path

import pytest

from entropix.evaluate.stats import mcnemar_exact

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compute_experiments.py"


@pytest.fixture()
def ce():
    spec = importlib.util.spec_from_file_location("compute_experiments", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_rows(path: Path, correct: list[bool], tokens: int) -> None:
    path.write_text("".join(json.dumps({"id": f"p{i}", "correct": c, "tokens": tokens}) + "\n"
                            for i, c in enumerate(correct)))


def test_seeds_table_pairs_rows_by_id_and_pools_the_seeds(ce, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # seed 1: auto right alone on 3, greedy right alone on 1; seed 2: 2 and 0, one auto row missing
    write_rows(a / "t_greedy.jsonl", [True, False, False, False, True, False], 10)
    write_rows(a / "t_auto.jsonl", [False, True, True, True, True, False], 50)
    write_rows(b / "t_greedy.jsonl", [False, False, True, False], 10)
    write_rows(b / "t_auto.jsonl", [True, True, True], 30)
    (b / "empty_greedy.jsonl").write_text("")
    (b / "empty_auto.jsonl").write_text("")  # a run still decoding: no row, no line
    ce.FRESH = {1: (a, 6), 2: (b, 4)}
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in ce.seeds_lines() if line.startswith("| t ")}
    assert set(rows) == {("t", "1"), ("t", "2"), ("t", "pooled")}
    assert f"| 3, 1 | {mcnemar_exact(3, 1):.3g} | 50 |" in rows["t", "1"]
    assert "| 3 | 33% (6%-79%) | 100% (44%-100%) | 2, 0 |" in rows["t", "2"]  # only the 3 paired problems
    assert "| 9 | 33% " in rows["t", "pooled"] and f"| 5, 1 | {mcnemar_exact(5, 1):.3g} | 43 |" in rows["t", "pooled"]
    assert not any("empty" in line for line in ce.seeds_lines())

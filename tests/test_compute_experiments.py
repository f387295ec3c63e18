"""The tables benchmarks/compute_experiments.py adds to the compute report: paired counts, exact p,
Holm's correction, the trivial floor, greedy's truncation and no-answer rates, pooling."""

import importlib.util
import json
from pathlib import Path

import pytest

from entropix.evaluate.tasks import Problem

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compute_experiments.py"


@pytest.fixture()
def ce():
    spec = importlib.util.spec_from_file_location("compute_experiments", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_rows(path: Path, correct: list[bool], tokens, expected=None, finish=None, extracted=None,
               branches=None) -> None:
    rows = []
    for i, c in enumerate(correct):
        row = {"id": f"p{i}", "prompt": f"question {i}", "correct": c,
               "tokens": tokens[i] if isinstance(tokens, list) else tokens,
               "expected": expected[i] if expected else "0",
               "finish_reason": finish[i] if finish else "stop",
               "extracted": extracted[i] if extracted else "0"}
        if branches:
            row["branches"] = [{"text": t} for t in branches[i]]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def table(lines: list[str], first: str) -> dict[tuple[str, ...], list[str]]:
    """Body rows of the markdown table whose first cell starts with `first`, keyed by their first two cells."""
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0].startswith(first) and cells[0] != "task" and not cells[0].startswith("---"):
            out[tuple(cells[:2])] = cells
    return out


def test_seeds_table_pairs_rows_by_id_pools_the_seeds_and_holm_corrects_the_per_seed_tests(ce, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # seed 1: auto right alone on 5, greedy on none; greedy stops at the cap on 2 of 8 (unfair) and
    # states no answer on 3 (None, "", None); "1" is the commonest expected answer (5 of 8)
    write_rows(a / "t_greedy.jsonl", [True, False, False, False, False, False, True, False], 10,
               expected=["1", "1", "2", "1", "3", "1", "1", "2"],
               finish=["stop", "length", "stop", "stop", "stop", "length", "stop", "stop"],
               extracted=["1", None, "5", "", "3", None, "1", "4"])
    write_rows(a / "t_auto.jsonl", [True, True, True, True, True, True, True, False], 50)
    # seed 2: auto right alone on 2 of the 3 paired problems (its 4th row is missing); "7" is right on 2 of 3
    write_rows(b / "t_greedy.jsonl", [False, False, True, False], 10, expected=["7", "7", "8", "9"])
    write_rows(b / "t_auto.jsonl", [True, True, True], 30)
    (b / "empty_greedy.jsonl").write_text("")
    (b / "empty_auto.jsonl").write_text("")  # a run still decoding: no row, no line
    ce.FRESH = {1: (a, 8), 2: (b, 4)}
    lines = ce.seeds_lines()
    rows = table(lines, "t")
    assert set(rows) == {("t †", "1"), ("t", "2"), ("t †", "pooled")}
    # p: seed 1 2/2^5 = 0.0625, seed 2 2/2^2 = 0.5; Holm over the 2 tests: 2 * 0.0625, then max(0.125, 0.5)
    assert rows["t †", "1"][2:] == ['8', 'always "1": 62.5%', "25.0% (7.1% – 59.1%)", "2 (25.0%)", "3 (37.5%)",
                                    "10.0", "87.5% (52.9% – 97.8%)", "50.0", "5, 0", "0.0625", "0.125"]
    assert rows["t", "2"][2:] == ['3', 'always "7": 66.7%', "33.3% (6.1% – 79.2%)", "0 (0.0%)", "0 (0.0%)",
                                  "10.0", "100.0% (43.9% – 100.0%)", "30.0", "2, 0", "0.5", "0.5"]
    # pooled: 11 problems, (8 * 50 + 3 * 30) / 11 = 44.5 auto tokens, "1" right on 5 of 11; no test
    assert rows["t †", "pooled"][2:] == ['11', 'always "1": 45.5%', "27.3% (9.7% – 56.6%)", "2 (18.2%)",
                                         "3 (27.3%)", "10.0", "90.9% (62.3% – 98.4%)", "44.5", "7, 0", "—", "—"]
    assert "over the 2 per-seed tests" in lines[2] and "no test" in lines[2]
    assert lines[-1].startswith("**Not a fair comparison (†)**") and "t seed 1 (2 of 8); t pooled (2 of 11)" in lines[-1]
    assert "seed 2" not in lines[-1]
    assert not any("empty" in line for line in lines)


def test_derived_table_grades_greedys_own_path_and_holm_corrects_each_comparison_over_the_tasks(ce, tmp_path, monkeypatch):
    expected = {"t": ["3", "3", "4", "3", "5"], "u": ["2", "2", "2", "2"]}
    monkeypatch.setattr(ce, "problems", lambda task, n, seed: [
        Problem(id=f"p{i}", prompt=f"question {i}", expected=e) for i, e in enumerate(expected[task])])
    # t: greedy right on p0 only, at the cap on 1 of 5 (unfair), no answer on 2; its own path asked
    # "So the answer is" gets p0-p2 right (b=2, c=0); auto adds p3 (b=1, c=0); p0 did not branch
    write_rows(tmp_path / "t_greedy.jsonl", [True, False, False, False, False], [10, 48, 12, 20, 10],
               expected=expected["t"], finish=["stop", "length", "stop", "stop", "stop"],
               extracted=["3", None, "2", None, "1"])
    write_rows(tmp_path / "t_auto.jsonl", [True, True, True, True, False], 100, expected=expected["t"],
               branches=[["The answer is 3"]] + [[t] + ["x"] * 4 for t in
                         ("So the answer is 3", "The answer is 4", "The answer is 7", "The answer is 1")])
    # u: greedy wrong on all 4, its asked path and auto right on all (b=4, c=0; then 0, 0)
    write_rows(tmp_path / "u_greedy.jsonl", [False] * 4, 10, expected=expected["u"], extracted=["1"] * 4)
    write_rows(tmp_path / "u_auto.jsonl", [True] * 4, 60, expected=expected["u"],
               branches=[["The answer is 2", "x"]] * 4)
    ce.FRESH = {5: (tmp_path, 5)}
    lines = ce.derived_lines(5)
    rows = table(lines, "")
    # greedy+ask vs greedy: p 2/4 = 0.5 and 2/16 = 0.125; Holm: 2 * 0.125 = 0.25, then max(0.25, 0.5)
    assert rows["t †", "5"][2:] == ['always "3": 60.0%', "20.0% (3.6% – 62.4%)", "1 (20.0%)", "2 (40.0%)", "20.0",
                                    "60.0% (23.1% – 88.2%)", "2, 0, 0.5", "0.5", "80.0% (37.6% – 96.4%)", "100.0",
                                    "1, 0, 1", "1", "4"]
    assert rows["u", "4"][2:] == ['always "2": 100.0%', "0.0% (0.0% – 49.0%)", "0 (0.0%)", "0 (0.0%)", "10.0",
                                  "100.0% (51.0% – 100.0%)", "4, 0, 0.125", "0.25", "100.0% (51.0% – 100.0%)",
                                  "60.0", "0, 0, 1", "1", "4"]
    assert lines[-1].startswith("**Not a fair comparison (†)**") and "t (1 of 5)" in lines[-1] and "u (" not in lines[-1]

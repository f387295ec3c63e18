import json

import pytest

from entropix.evaluate.regrade import regrade_dir, regrade_file
from entropix.evaluate.tasks import make_task


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_regrade_fixes_stale_verdicts_and_keeps_outputs(tmp_path):
    probs = make_task("compare", 2, seed=3)
    right = f"The larger number is {probs[0].expected}."
    rows = [{"id": probs[0].id, "task": "compare", "sampler": "greedy", "output": right, "correct": False},
            {"id": probs[1].id, "task": "compare", "sampler": "greedy", "output": "I cannot tell.", "correct": False}]
    path = tmp_path / "compare_greedy.jsonl"
    _write(path, rows)
    assert regrade_file(path, {p.id: p for p in probs}) == 1
    back = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["correct"] for r in back] == [True, False]
    assert [r["output"] for r in back] == [right, "I cannot tell."]
    # a second pass changes nothing and leaves the file as it is
    before = path.read_text()
    assert regrade_dir(tmp_path, lambda task: make_task(task, 2, seed=3)) == {"compare_greedy.jsonl": 0}
    assert path.read_text() == before


def test_regrade_refuses_a_row_of_another_problem_set(tmp_path):
    path = tmp_path / "compare_greedy.jsonl"
    _write(path, [{"id": "compare-99-0", "task": "compare", "sampler": "greedy", "output": "1", "correct": True}])
    with pytest.raises(ValueError, match="not one of the task's problems"):
        regrade_file(path, {p.id: p for p in make_task("compare", 2, seed=3)})

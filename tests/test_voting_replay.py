"""The development replay that chose deepconf's settings (benchmarks/deepconf_dev.py) against the
real strategy, and seed 9's report tables (benchmarks/fresh_seed9.py) on rows written here."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from entropix.decode.phases import collect, requests_for
from entropix.decode.scoring import branch_of, token_confidence
from entropix.decode.strategies import Task, decode, run
from entropix.sampler import catalog

from tinymodel import tiny_lm

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(seed=4)


def test_prune_point_by_hand():
    dev = load("deepconf_dev")
    assert dev.pruned_at([4.0, 4.0, 1.0, 1.0, 4.0, 4.0], "stop", 2, 2.0) == 3  # (1 + 1) / 2 < 2 first at 3
    assert dev.pruned_at([4.0, 4.0, 1.0], "stop", 2, 3.0) is None  # (4 + 4) / 2 passes; a finished last token is never cut
    assert dev.pruned_at([4.0, 4.0, 1.0], None, 2, 3.0) == 2  # unfinished: cut there


@pytest.mark.parametrize("seed,consensus", [(3, 2.0), (5, 0.6), (11, 0.75)])
def test_replay_spends_and_chooses_what_deepconf_does(tiny, seed, consensus):
    dev = load("deepconf_dev")
    task = Task(prompts=[[80, 81, 82]], max_tokens=[12], seeds=[seed], kind="pattern", pattern=r"(?s)(.)$")
    params = {**catalog.parameters("deepconf", samples=8, temperature=1.0), "window": 3, "keep": 0.5,
              "consensus": consensus}
    real = run(tiny.engine(), decode(catalog.build("deepconf", params, tiny), task, tiny.tokenizer, 512))[0]
    sc = catalog.resolve("self-consistency", tiny, samples=8, temperature=1.0)
    req = requests_for(sc, task, 8, 5)[0]
    got = collect(tiny.engine(), [req])[req.id]
    traces = []
    for c in range(8):
        b = branch_of(c, got[c], task.kind, task.pattern)
        traces.append({"conf": [token_confidence([x for _, _, x in r.top[:5]]) for r in got[c]], "answer": b.answer,
                       "finish": b.finish_reason, "right": b.answer == real["answer"]})
    right, spent = dev.replay({"kind": task.kind, "traces": traces}, params["warmup"], params["keep"],
                              params["window"], params["consensus"])
    assert spent == real["tokens_generated"]
    assert right == (real["answer"] is not None)  # the replay picks a trace with the real vote's answer


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_primary_table_pairs_deepconf_with_self_consistency_and_counts_loops(tmp_path):
    s9 = load("fresh_seed9")
    s9.FOLDER, s9.TASKS = tmp_path, ("t",)

    def rows(correct, tokens, **kw):
        return [{"id": f"p{i}", "prompt": f"q {i}", "expected": "1", "correct": c, "tokens": tokens, "extracted": "1",
                 **kw} for i, c in enumerate(correct)]

    greedy = rows([True, False, False, False], 10, finish_reason="stop")
    greedy[1].update(finish_reason="length", output="So 2 = 3 * 1 = " + "3 * 1 = " * 20)  # a loop
    rng = random.Random(0)
    greedy[2].update(finish_reason="length", output="".join(rng.choice("abcdefgh ") for _ in range(200)))
    write(tmp_path / "t_greedy.jsonl", greedy)
    write(tmp_path / "t_self-consistency-16.jsonl", rows([True, True, False, False], 100))
    dc = rows([True, False, True, True, True], 40)  # p4 has no partner: left out
    dc[0]["branches"] = [{}] * 4  # stopped after the warm-up
    write(tmp_path / "t_deepconf.jsonl", dc)
    lines = s9.primary_lines()
    body = [line for line in lines if line.startswith("| t |")]
    cells = [c.strip() for c in body[0].split("|")[1:-1]]
    # b = 2 (p2, p3), c = 1 (p1): p = 1.0; 160 of 400 tokens; 2 cut rows, 1 of them looping
    assert cells[1] == "4" and cells[4] == "2 (50.0%; 1 looping)"
    assert cells[9:] == ["40.0", "0.40", "1", "2, 1", "1", "1"]
    assert lines[-1] == "Over all tasks deepconf spent 40.0% of self-consistency-16's tokens."

"""`entropix eval` / `eval-report`: decoding loop, results files, resume, CLI errors."""

import json

import pytest

from entropix import EntropixError
from entropix.cli import main
from entropix.evaluate.runner import (
    answer_kind,
    load_done,
    problem_seed,
    run_eval,
    sampler_params,
    summarise,
)
from entropix.evaluate.tasks import Problem, is_correct, make_task
from entropix.sampler import catalog

ROW_KEYS = {"id", "task", "sampler", "prompt", "output", "extracted", "expected", "correct", "tokens", "seconds"}
SUMMARY_KEYS = {"task", "sampler", "n", "correct", "accuracy", "ci95", "tokens_per_problem", "seconds"}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    """A tiny random checkpoint with the embedded tokenizer: the runner's claims (order, resume,
    seeds, batching) hold for any model; the embedded one runs `eval` in tests/test_readme_commands.py."""
    from tiny import write_hf_model

    return write_hf_model(tmp_path_factory.mktemp("eval") / "tiny", gguf_path)


@pytest.fixture
def cli_tiny(cli_load_once, tiny_hf):
    """`eval` on the tiny checkpoint, loaded once for the module's in-process CLI calls."""
    return ["--model", str(tiny_hf)]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------- end to end


def test_eval_end_to_end_greedy_and_resume(cli_tiny, capsys, tmp_path):
    out = tmp_path / "res.jsonl"
    args = ["eval", *cli_tiny, "--task", "compare", "--sampler", "greedy", "--limit", "5", "--max-tokens", "12",
            "--batch-size", "2", "--out", str(out), "--json", "--quiet"]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert SUMMARY_KEYS <= set(summary)
    rows = read_rows(out)
    problems = make_task("compare", 5, 0)
    assert [r["id"] for r in rows] == [p.id for p in problems]  # batch 2 with refills keeps the order here
    for row, p in zip(rows, problems):
        assert ROW_KEYS <= set(row)
        assert (row["task"], row["sampler"], row["expected"]) == ("compare", "greedy", p.expected)
        assert row["prompt"] == p.prompt
        assert 1 <= row["tokens"] <= 12 and row["seconds"] > 0
        assert (row["extracted"], row["correct"]) == is_correct(p, row["output"])
    assert summary["task"] == "compare" and summary["sampler"] == "greedy"
    assert summary["n"] == 5 and summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / 5)
    lo, hi = summary["ci95"]
    assert 0 <= lo <= summary["accuracy"] <= hi <= 1
    assert summary["tokens_per_problem"] == pytest.approx(sum(r["tokens"] for r in rows) / 5, abs=1e-3)
    assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=1e-2)

    # Same batch, one prefill: greedy outputs do not depend on how problems were batched.
    single = tmp_path / "b5.jsonl"
    assert run_cli(capsys, *args[:-4], "--batch-size", "5", "--out", str(single), "--json", "--quiet")[0] == 0
    assert [r["output"] for r in read_rows(single)] == [r["output"] for r in rows]

    # Resume: everything done -> nothing rerun, nothing appended, same summary.
    before = out.read_text()
    code, stdout, _ = run_cli(capsys, *args)
    again = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and out.read_text() == before
    assert again["skipped"] == 5
    assert {k: again[k] for k in SUMMARY_KEYS} == {k: summary[k] for k in SUMMARY_KEYS}

    # Drop two rows and cut the last one mid-write: only those two are decoded again.
    lines = before.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20])
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "partially written" in err
    rows2 = read_rows(out)
    assert [r["id"] for r in rows2] == [p.id for p in problems]
    assert [r["output"] for r in rows2] == [r["output"] for r in rows]
    assert json.loads(stdout.strip().splitlines()[-1])["skipped"] == 3


def test_eval_sampling_is_seeded_per_problem(cli_tiny, capsys, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    base = ["eval", *cli_tiny, "--task", "letters", "--sampler", "min-p", "--limit", "5", "--max-tokens", "10", "--seed", "3",
            "--json", "--quiet"]
    assert run_cli(capsys, *base, "--batch-size", "5", "--out", str(a))[0] == 0
    assert run_cli(capsys, *base, "--batch-size", "2", "--out", str(b))[0] == 0
    ra, rb = read_rows(a), read_rows(b)
    assert len(ra) == 5 and all(r["sampler"] == "min-p" for r in ra)
    assert ra[0]["params"] == {"temperature": 1.0, "min_p": 0.1}
    # A problem's sample depends on its own seed only, not on its batch neighbours.
    assert {r["id"]: r["output"] for r in ra} == {r["id"]: r["output"] for r in rb}
    # The letters prompts ask about different words, so the samples differ between problems.
    assert len({r["output"] for r in ra}) > 1


def test_eval_entropix_sampler(cli_tiny, capsys, tmp_path):
    out = tmp_path / "e.jsonl"
    code, stdout, _ = run_cli(capsys, "eval", *cli_tiny, "--task", "compare", "--sampler", "entropix", "--limit", "3",
                              "--max-tokens", "10", "--out", str(out), "--json", "--quiet")
    assert code == 0
    rows = read_rows(out)
    assert len(rows) == 3 and all(r["sampler"] == "entropix" and 1 <= r["tokens"] <= 10 for r in rows)
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == 3


def test_eval_cot_through_its_strategy(cli_tiny, capsys, tmp_path):
    out = tmp_path / "cot.jsonl"
    code, stdout, _ = run_cli(capsys, "eval", *cli_tiny, "--task", "letters", "--sampler", "cot", "--branches", "3", "--limit", "2",
                              "--max-tokens", "8", "--batch-size", "6", "--out", str(out), "--json", "--quiet")
    assert code == 0
    rows = read_rows(out)
    assert [r["sampler"] for r in rows] == ["cot", "cot"]
    for r in rows:
        assert len(r["branches"]) == 3 and r["params"] == {"branches": 3, "aggregate": False}
        # Three rows of up to 8 tokens, plus any "So the answer is" follow-ups (up to 16 tokens each).
        assert 3 <= r["tokens"] <= 3 * 8 + 3 * 16
        assert r["output"] in [b["text"] for b in r["branches"]]
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == 2


class FakeStrategies:
    """Stands in for the strategy driver: records each chunk, returns results without decoding."""

    def __init__(self):
        self.calls = []

    def decode(self, dec, task, tok, max_context):
        return task

    def run(self, engine, task):
        self.calls.append((len(task.prompts), task.kind, task.pattern, list(task.seeds)))
        assert all(isinstance(p, list) and p for p in task.prompts)
        return [{"text": f"The answer is {i}.", "answer": str(i), "tokens_generated": 10 * (i + 1),
                 "branches": [{"answer": str(i), "score": 0.5, "tokens": [1, 2], "text": "x"}]}
                for i in range(len(task.prompts))]


def test_multi_row_path(monkeypatch, tmp_path):
    from tinymodel import tiny_lm

    lm = tiny_lm()
    fake = FakeStrategies()
    monkeypatch.setattr("entropix.decode.strategies.decode", fake.decode)
    monkeypatch.setattr("entropix.decode.strategies.run", fake.run)
    problems = [Problem(f"p{i}", f"What is {i} + 0?", str(i % 2)) for i in range(5)]
    out = tmp_path / "m.jsonl"
    dec = catalog.resolve("self-consistency", lm, samples=4)
    s = run_eval(lm, problems, "self-consistency", task="toy", out=out, batch_size=8, progress=False, decoder=dec)
    # 8 rows per chunk at 4 rows per problem: chunks of 2, 2 and 1 problems.
    assert [c[0] for c in fake.calls] == [2, 2, 1]
    assert all(c[1:3] == ("number", None) for c in fake.calls)
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [p.id for p in problems]
    assert [r["tokens"] for r in rows] == [10, 20, 10, 20, 10]
    assert [r["decoder_answer"] for r in rows] == ["0", "1", "0", "1", "0"]
    assert all(r["correct"] for r in rows)  # "The answer is i." graded against i % 2 with i in {0, 1}
    assert rows[0]["branches"] == [{"answer": "0", "score": 0.5, "text": "x"}]  # token lists dropped
    assert rows[0]["params"] == {"samples": 4, "temperature": 0.7}  # what the decoder used
    assert s["n"] == 5 and s["correct"] == 5 and s["tokens_per_problem"] == 14.0
    # Resume skips all of them: no decoder call.
    again = run_eval(lm, problems, "self-consistency", task="toy", out=out, progress=False, decoder=dec)
    assert again["skipped"] == 5 and again["n"] == 5 and len(fake.calls) == 3


def test_answer_kinds():
    coin = make_task("coinflip", 1, 0)[0]
    assert answer_kind(coin) == ("text", r"(?i)\b(yes|no)\b")
    assert answer_kind(make_task("sort", 1, 0)[0]) == ("list", None)
    assert answer_kind(make_task("arithmetic", 1, 0)[0]) == ("number", None)
    assert answer_kind(Problem("o", "Pick.", "B", "option", {"options": {"A": "a", "B": "b"}})) == ("option", None)


@pytest.mark.parametrize("text, answer", [
    ("9.9 is larger than 9.11.", "9.9"),
    ("Comparing 9.11 and 9.9, the larger number is 9.9.", "9.9"),
    ("9.9 > 9.11", "9.9"),
    ("9.11 < 9.9", "9.9"),
    ("So the answer is 9.11.", "9.11"),
    ("9.11 is bigger than 9.9", "9.11"),
    ("To compare them, 9.11 has more digits.", None),
])
def test_compare_answer_region(text, answer):
    # Multi-row decoders score and vote on the number the text calls larger, as the grader does.
    from entropix.answers import extract_answer

    kind, pattern = answer_kind(make_task("compare", 1, 0)[0])
    assert extract_answer(text, kind, pattern) == answer
    if answer is not None:
        p = Problem("c", "Which is larger: 9.9 or 9.11?", "9.9", "number", {"format": "compare", "candidates": ["9.9", "9.11"]})
        assert is_correct(p, text)[0] == answer


# ---------------------------------------------------------------------- parameters


def test_sampler_params_defaults_and_errors():
    assert set(catalog.names()) >= {"greedy", "temperature", "min-p", "self-consistency", "cot", "cot-agg",
                                    "entropix", "entropix-branching"}
    assert sampler_params("greedy") == {}
    assert sampler_params("temperature") == {"temperature": 0.7}
    assert sampler_params("temperature", temperature=1.2) == {"temperature": 1.2}
    assert sampler_params("min-p") == {"temperature": 1.0, "min_p": 0.1}
    assert sampler_params("self-consistency", samples=8) == {"samples": 8, "temperature": 0.7}
    assert sampler_params("cot") == {"branches": 10, "aggregate": False}
    assert sampler_params("cot", aggregate=True) == {"branches": 10, "aggregate": True}
    assert sampler_params("cot-agg", branches=4) == {"branches": 4, "aggregate": True}
    assert sampler_params("entropix-branching") == {}
    with pytest.raises(EntropixError, match="--samples does not apply to sampler 'greedy'"):
        sampler_params("greedy", samples=3)
    with pytest.raises(EntropixError, match="unknown sampler 'beam'.*greedy"):
        sampler_params("beam")
    with pytest.raises(EntropixError, match="--branches must be between 1 and 64"):
        sampler_params("cot", branches=0)
    with pytest.raises(EntropixError, match="temperature"):
        sampler_params("temperature", temperature=-1.0)
    with pytest.raises(EntropixError, match="not found"):
        sampler_params("entropix", sampler_config="/nonexistent/profile.json")


def test_problem_seed_is_stable():
    assert problem_seed(0, "a") == problem_seed(0, "a")
    assert problem_seed(0, "a") != problem_seed(0, "b")
    assert problem_seed(1, "a") != problem_seed(0, "a")
    assert 0 <= problem_seed(2**40, "x") < 2**31


def test_summarise():
    rows = [{"correct": True, "tokens": 10, "seconds": 1.0}, {"correct": False, "tokens": 30, "seconds": 2.5}]
    s = summarise(rows, "t", "greedy")
    assert (s["n"], s["correct"], s["accuracy"], s["tokens_per_problem"], s["seconds"]) == (2, 1, 0.5, 20.0, 3.5)
    assert s["ci95"][0] < 0.5 < s["ci95"][1]
    assert summarise([], "t", "g")["n"] == 0


# ------------------------------------------------------------------------ results file


def test_load_done_repairs_an_interrupted_file(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    assert load_done(f) == []
    f.write_text('{"id": "a", "correct": true}\n\n{"id": "b", "correct": false}\n{"id": "c", "cor')
    rows = load_done(f)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert f.read_text() == '{"id": "a", "correct": true}\n\n{"id": "b", "correct": false}\n'
    assert "partially written" in capsys.readouterr().err
    f.write_text('{"id": "a"}')  # complete row, no newline: one is added before appending
    assert [r["id"] for r in load_done(f)] == ["a"]
    assert f.read_text() == '{"id": "a"}\n'


def test_load_done_refuses_a_damaged_file(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(EntropixError, match=r"r.jsonl:2: not a results row"):
        load_done(f)
    f.write_text('[1, 2]\n{"id": "b"}\n')
    with pytest.raises(EntropixError, match=r":1:"):
        load_done(f)


# ---------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "nope"], "unknown task 'nope'; known tasks: arithmetic"),
        (["--task", "letters", "--sampler", "beam"], "unknown sampler 'beam' (known: greedy"),
        (["--task", "gsm8k", "--data", "/nonexistent/g.jsonl"], "--data file not found: /nonexistent/g.jsonl"),
        (["--task", "letters", "--data", "x.jsonl"], "synthetic and takes no data file"),
        (["--task", "letters", "--samples", "3"], "--samples does not apply to sampler 'greedy'"),
        (["--task", "letters", "--sampler", "min-p", "--aggregate"], "--aggregate does not apply"),
        (["--task", "letters", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--task", "letters", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--task", "letters", "--limit", "-2"], "--limit must be non-negative"),
    ],
)
def test_eval_cli_errors(capsys, monkeypatch, argv, message):
    def no_load(*a, **k):
        raise AssertionError("bad input must fail before the model loads")

    monkeypatch.setattr("entropix.cli.eval.load", no_load)
    code, out, err = run_cli(capsys, "eval", *argv)
    assert code == 2
    assert err.startswith("entropix: error: ") and message in err
    assert err.count("\n") == 1 and out == ""


def test_eval_cli_bad_gsm8k_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("entropix.cli.eval.load", lambda *a, **k: pytest.fail("loaded the model"))
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "Q", "answer": "#### 1"}\n{oops\n')
    code, _, err = run_cli(capsys, "eval", "--task", "gsm8k", "--data", str(f))
    assert code == 2 and f"{f}:2: invalid JSON" in err and err.count("\n") == 1


def test_eval_gsm8k_prompts_use_chat_template(tiny_hf, gsm8k_path, gsm8k_rows):
    from entropix.evaluate.runner import prompt_tokens
    from entropix.evaluate.tasks import load_task
    from entropix.loading import load_model

    lm = load_model(str(tiny_hf), device="cpu", progress=False)  # the embedded model's tokenizer and template
    p = load_task("gsm8k", 1, data=gsm8k_path)[0]
    text = lm.tokenizer.decode(prompt_tokens(lm, p))
    assert f"<|im_start|>user\n{gsm8k_rows[0]['question']}" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


# ---------------------------------------------------------------------------- eval-report


def test_eval_report_cli(capsys, tmp_path):
    res = tmp_path / "r.jsonl"
    rows = []
    for i in range(6):
        for sampler, ok in (("greedy", i < 2), ("entropix", i < 4)):
            rows.append({"id": f"x{i}", "task": "letters", "sampler": sampler, "correct": ok, "tokens": 5,
                         "seconds": 0.25})
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pre = tmp_path / "pre.md"
    pre.write_text("Setup: embedded model on 2 cores.\n")
    md = tmp_path / "docs" / "RESULTS.md"
    code, out, _ = run_cli(capsys, "eval-report", str(res), "-o", str(md), "--title", "Results", "--preamble", str(pre))
    assert code == 0 and out.strip() == str(md)
    text = md.read_text()
    assert text.startswith("# Results\n\nSetup: embedded model on 2 cores.\n\n")
    assert "| greedy | 6 | 2 |" in text and "| entropix | 6 | 4 |" in text
    assert (md.parent / "RESULTS_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(capsys, "eval-report", str(tmp_path / "none.jsonl"), "-o", str(md))
    assert code == 2 and "not found" in err

"""Result loading and markdown/PNG report generation."""

import json
import re

import pytest

from entropix.evaluate.report import build_report, eval_report, load_results, main
from entropix.evaluate.stats import mcnemar_exact

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_rows():
    """Two tasks; on arithmetic greedy gets 6/10 and entropix 9/10 with b=4, c=1."""
    rows = []
    greedy = [True] * 6 + [False] * 4
    entropix = [True] * 5 + [False] + [True] * 4
    for i, (g, e) in enumerate(zip(greedy, entropix)):
        for sampler, ok, tokens in (("greedy", g, 100), ("entropix", e, 150)):
            rows.append(
                {
                    "id": f"arithmetic-0-{i}", "task": "arithmetic", "sampler": sampler,
                    "prompt": "Compute 1 + 1.", "output": "2", "extracted": "2" if ok else "3",
                    "expected": "2", "correct": ok, "tokens": tokens, "seconds": 0.5,
                }
            )
    for i in range(4):
        rows.append(
            {
                "id": f"letters-0-{i}", "task": "letters", "sampler": "greedy", "prompt": "p",
                "output": "o", "extracted": "1", "expected": "1", "correct": i < 3, "tokens": 20, "seconds": 1.0,
            }
        )
    return rows


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + tail)
    return path


def test_load_results_roundtrip(tmp_path):
    rows = make_rows()
    a = write_jsonl(tmp_path / "a.jsonl", rows[:7])
    b = write_jsonl(tmp_path / "b.jsonl", rows[7:])
    assert load_results([a, b]) == rows
    assert load_results(str(a)) == rows[:7]


def test_load_results_skips_partial_last_line(tmp_path):
    rows = make_rows()[:3]
    f = write_jsonl(tmp_path / "r.jsonl", rows, tail='{"id": "x", "task": "ari')
    with pytest.warns(UserWarning, match="partially written"):
        assert load_results(f) == rows


def test_load_results_keeps_unicode_line_separators(tmp_path):
    row = dict(make_rows()[0], output="a\u2028b")
    f = write_jsonl(tmp_path / "u.jsonl", [row])
    assert load_results(f)[0]["output"] == "a\u2028b"


def test_load_results_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_results(tmp_path / "missing.jsonl")
    rows = make_rows()[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{broken\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"id": "1", "task": "t"}) + "\n")
    with pytest.raises(ValueError, match="missing field.*sampler.*correct"):
        load_results(bad)


def test_build_report(tmp_path):
    out = tmp_path / "out" / "report.md"
    text = build_report(make_rows(), out, title="Test run")
    assert out.read_text() == text
    assert text.startswith("# Test run")
    assert ("| sampler | n | correct | accuracy | 95% CI | tokens/problem | truncated | no answer | commonest answer "
            "| seconds total | McNemar vs greedy (b, c, p) | Holm p |") in text
    assert "## arithmetic" in text and "## letters" in text

    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    greedy = [c.strip() for c in re.findall(r"\| greedy \|.*", text)[0].split("|")[1:-1]]
    assert greedy[:4] == ["greedy", "10", "6", "60.0%"]
    assert greedy[4] == "31.3% – 83.2%"  # Wilson 6/10
    assert greedy[5] == "100.0" and greedy[9] == "5.0"
    assert greedy[6:9] == ["—", "0 (0.0%)", '"2", 60% of answers']  # no finish reasons recorded; 4 rows say "3"
    assert greedy[10:] == ["—", "—"]
    ent = [c.strip() for c in lines["entropix"].split("|")[1:-1]]
    assert ent[:4] == ["entropix", "10", "9", "90.0%"]
    assert ent[5] == "150.0"
    assert ent[10] == f"4, 1, {mcnemar_exact(4, 1):.3g}"
    assert ent[11] == f"{mcnemar_exact(4, 1):.3g}"  # a family of one: Holm leaves p alone
    # The floor: every arithmetic problem expects "2", so a constant "2" gets all ten.
    floor = [c.strip() for c in lines['floor: always "2"'].split("|")[1:-1]]
    assert floor[:5] == ['floor: always "2"', "10", "10", "100.0%", "72.2% – 100.0%"]  # Wilson 10/10
    # Greedy comes first within a task.
    arithmetic = text.split("## arithmetic")[1].split("##")[0]
    assert arithmetic.index("| greedy") < arithmetic.index("| entropix")
    # Total run time: 20 * 0.5 + 4 * 1.0 seconds.
    assert "14.0 s (0:00:14)" in text

    for name in ("report_accuracy.png", "report_tokens.png"):
        png = out.parent / name
        assert f"]({name})" in text
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        # Valid PNG: the IHDR chunk follows, with a non-zero width and height.
        assert data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100


def two_option_rows(task, greedy_ok, other_ok, greedy_trunc=0):
    """Rows of a "Which is larger" task whose larger number is always second; greedy's first
    greedy_trunc rows end at the token cap with no answer."""
    rows = []
    for i, (g, o) in enumerate(zip(greedy_ok, other_ok)):
        base = {"id": f"{task}-{i}", "task": task, "prompt": f"Which is larger: {i}.1 or {i}.5?",
                "expected": f"{i}.5", "max_tokens": 48}
        cut = i < greedy_trunc
        rows.append(dict(base, sampler="greedy", correct=g, tokens=48 if cut else 9,
                         extracted=None if cut else (f"{i}.5" if g else f"{i}.1"),
                         finish_reason="length" if cut else "stop"))
        rows.append(dict(base, sampler="auto", correct=o, tokens=60, extracted=f"{i}.5" if o else f"{i}.1"))
    return rows


def cells(text, task, sampler):
    section = text.split(f"## {task}\n")[1].split("\n## ")[0]
    line = next(x for x in section.splitlines() if x.startswith(f"| {sampler} |"))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_report_floor_truncation_and_holm(tmp_path):
    # Task a: greedy 10/20, auto 20/20 (b=10, c=0), greedy cut off on 4 rows (20%): unfair.
    # Task b: greedy 10/20, auto 15/20 (b=6, c=1), greedy finishes everywhere: fair.
    a = two_option_rows("a", [i % 2 == 0 for i in range(20)], [True] * 20, greedy_trunc=4)
    b = two_option_rows("b", [i < 10 for i in range(20)], [i < 9 or 10 <= i < 16 for i in range(20)])
    text = build_report(a + b, tmp_path / "r.md")
    pa, pb = mcnemar_exact(10, 0), mcnemar_exact(6, 1)
    assert (pa, pb) == (pytest.approx(2 / 1024), pytest.approx(2 * 8 / 128))
    ha, hb = cells(text, "a", "auto"), cells(text, "b", "auto")
    # Holm over auto's two tasks: the smaller p doubled, the larger kept (but not below the first).
    assert ha[10] == f"10, 0, {pa:.3g} †" and ha[11] == f"{2 * pa:.3g}"
    assert hb[10] == f"6, 1, {pb:.3g}" and hb[11] == f"{max(pb, 2 * pa):.3g}"
    ga = cells(text, "a", "greedy")
    assert ga[6:9] == ["4 (20.0%)", "4 (20.0%)", "first option, 50% of option answers"]  # 8 and 8: a tie goes first
    assert "greedy stops at the token cap (48 tokens) on 4 of 20 rows (20.0%" in text.split("## b")[0]
    assert "Not a fair comparison" not in text.split("## b\n")[1].split("## Notes")[0]
    # The floor is "always the second option" (20/20) on both tasks, above greedy and level with auto.
    assert cells(text, "a", "floor: always the second option")[1:4] == ["20", "20", "100.0%"]
    floor = text.split("## Against the floor")[1].split("\n## ")[0]
    row_a = next(x for x in floor.splitlines() if x.startswith("| a |"))
    assert "always the second option" in row_a and "4 (20.0%)" in row_a and "no †" in row_a
    assert f"auto better ({2 * pa:.2g})" in row_a
    row_b = next(x for x in floor.splitlines() if x.startswith("| b |"))
    assert "| yes |" in row_b and row_b.endswith("| none |")  # p = 0.125 is not significant


def test_report_without_greedy_and_with_duplicates(tmp_path):
    rows = [r for r in make_rows() if r["sampler"] == "entropix"]
    rows.append(dict(rows[0], correct=False))  # a resumed run repeats a problem
    text = build_report(rows, tmp_path / "r.md")
    assert "n/a (no greedy run)" in text
    assert "| entropix | 10 | 8 |" in text  # the later row replaced the earlier one
    assert "1 repeated row" in text


def test_report_partial_overlap(tmp_path):
    rows = make_rows()
    rows = [r for r in rows if not (r["sampler"] == "entropix" and r["id"].endswith("-9"))]
    text = build_report(rows, tmp_path / "r.md")
    assert "(on 9 shared)" in text


def test_report_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no results"):
        build_report([], tmp_path / "r.md")


@pytest.mark.slow  # draws PNGs with matplotlib (~1 s)
def test_eval_report_and_main(tmp_path, capsys):
    f = write_jsonl(tmp_path / "res.jsonl", make_rows())
    out = tmp_path / "eval.md"
    text = eval_report([f], out)
    assert "## arithmetic" in text and (tmp_path / "eval_accuracy.png").exists()
    assert main([str(f), "-o", str(tmp_path / "cli.md"), "--title", "CLI"]) == 0
    assert (tmp_path / "cli.md").read_text().startswith("# CLI")
    assert main([str(tmp_path / "absent.jsonl"), "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


# ------------------------------------------------------------------ compute-accuracy picture


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_compute_plot_data_points_and_intervals():
    from entropix.evaluate.report import compute_plot_data
    from entropix.evaluate.stats import wilson_interval

    rows = make_rows()
    rows.append(dict(rows[0], sampler="cot", tokens=0))  # no tokens to place on a log axis: left out
    points = compute_plot_data(rows)
    assert list(points) == ["arithmetic", "letters"]
    greedy, entropix = points["arithmetic"]  # greedy first, then file order
    assert (greedy.sampler, greedy.n, greedy.tokens, greedy.accuracy) == ("greedy", 10, 100.0, 0.6)
    assert (greedy.low, greedy.high) == pytest.approx(wilson_interval(6, 10))
    assert greedy.low == pytest.approx(0.3127, abs=1e-4) and greedy.high == pytest.approx(0.8318, abs=1e-4)
    assert (entropix.sampler, entropix.tokens, entropix.accuracy) == ("entropix", 150.0, 0.9)
    assert (entropix.low, entropix.high) == pytest.approx(wilson_interval(9, 10))
    (letters,) = points["letters"]
    assert (letters.sampler, letters.n, letters.tokens, letters.accuracy) == ("greedy", 4, 20.0, 0.75)


def test_compute_plot_data_averages_tokens_and_keeps_last_row():
    from entropix.evaluate.report import compute_plot_data

    rows = [
        {"id": "a", "task": "t", "sampler": "sc", "correct": False, "tokens": 10},
        {"id": "b", "task": "t", "sampler": "sc", "correct": True, "tokens": 30},
        {"id": "a", "task": "t", "sampler": "sc", "correct": True, "tokens": 50},  # a rerun replaces row 1
        {"id": "a", "task": "u", "sampler": "sc", "correct": True},  # no tokens at all: no point
    ]
    points = compute_plot_data(rows)
    assert list(points) == ["t"]
    (p,) = points["t"]
    assert (p.n, p.accuracy, p.tokens, p.high) == (2, 1.0, 40.0, 1.0)


def test_pareto_front():
    from entropix.plots.compute import ComputePoint, pareto_front

    def pt(name, tokens, acc):
        return ComputePoint(name, tokens, acc, 0.0, 1.0, 10)

    pts = [pt("cot", 1000, 0.5), pt("greedy", 100, 0.3), pt("sc", 500, 0.2), pt("x", 100, 0.1), pt("big", 2000, 0.5)]
    assert [p.sampler for p in pareto_front(pts)] == ["greedy", "cot"]


@pytest.mark.slow  # draws PNGs with matplotlib (~1 s)
def test_report_draws_and_links_compute_plot(tmp_path):
    out = tmp_path / "r.md"
    text = build_report(make_rows(), out)
    assert "![Accuracy vs tokens per problem, per task](r_compute.png)" in text
    w, h = png_size(tmp_path / "r_compute.png")
    assert w > 300 and h > 200
    # Elsewhere (e.g. docs/ while the markdown lies beside it), linked by a relative path.
    pic = tmp_path / "pics" / "compute.png"
    text = eval_report([write_jsonl(tmp_path / "res.jsonl", make_rows())], tmp_path / "md" / "e.md", compute_plot=pic)
    assert "](../pics/compute.png)" in text
    png_size(pic)
    with pytest.raises(ValueError, match=r"\.png"):
        build_report(make_rows(), out, compute_plot=tmp_path / "c.jpg")


@pytest.mark.slow  # draws PNGs with matplotlib (~1 s)
def test_compute_plot_cli(tmp_path, capsys):
    from entropix.cli import main as cli_main

    f = write_jsonl(tmp_path / "res.jsonl", make_rows())
    pic = tmp_path / "docs" / "pic.png"
    assert cli_main(["eval-report", str(f), "-o", str(tmp_path / "R.md"), "--compute-plot", str(pic)]) == 0
    assert "](docs/pic.png)" in (tmp_path / "R.md").read_text()
    png_size(pic)
    assert main([str(f), "-o", str(tmp_path / "m.md"), "--compute-plot", str(tmp_path / "m.png")]) == 0
    png_size(tmp_path / "m.png")

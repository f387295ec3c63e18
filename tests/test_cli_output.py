"""`entropix generate` output that pipes: stdout is the answer (or the JSON), the rest goes to stderr."""

from __future__ import annotations

import json
import re

import pytest

from entropix.answer_format import prompt_answer_format
from entropix.cli import main

from tiny import write_hf_model

# The closing line of a decode, as greedy prints it: tokens, seconds, rate, finish reason.
END_LINE = re.compile(r"\[(\d+) tokens in (\d+\.\d+)s, (\d+\.\d+) tokens/s, finish: (\w+)\]")

MULTI_ROW = {
    "cot": ["--sampler", "cot", "--branches", "3"],
    "self-consistency": ["--sampler", "self-consistency", "--samples", "3", "--temperature", "0.7", "--seed", "1"],
    "auto": ["--sampler", "auto", "--branches", "3"],
    "branching": ["--sampler", "entropix", "--branching", "--seed", "1"],
}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    """A tiny random model: loads in a blink, decodes deterministically for a seed."""
    return write_hf_model(tmp_path_factory.mktemp("out") / "tiny", gguf_path)


def generate(capsys, tiny_hf, prompt: str, *flags: str) -> tuple[str, str]:
    rc = main(["generate", prompt, "--model", str(tiny_hf), "--device", "cpu", "--max-tokens", "6", *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


@pytest.mark.parametrize("sampler", sorted(MULTI_ROW))
def test_multi_row_stdout_is_only_the_chosen_text(sampler, tiny_hf, cli_load_once, capsys):
    """The same decode twice: with --json for reference, then plain, whose stdout must be that text alone."""
    res = json.loads(generate(capsys, tiny_hf, "What is 2 + 3?", "--json", *MULTI_ROW[sampler])[0])
    out, err = generate(capsys, tiny_hf, "What is 2 + 3?", *MULTI_ROW[sampler])
    assert out == res["text"] + "\n"
    assert "=> [" in err  # the branch table moved to stderr


def test_the_load_notices_go_to_stderr(tiny_hf, capsys):
    """A real load (the other tests load the checkpoint once: cli_load_once)."""
    out, err = generate(capsys, tiny_hf, "What is 2 + 3?", *MULTI_ROW["cot"])
    assert "loading model" in err and "loaded " in err
    assert "loading model" not in out and "loaded " not in out


@pytest.mark.parametrize("sampler", ["cot", "self-consistency", "auto"])
def test_multi_row_ends_with_greedys_line(sampler, tiny_hf, cli_load_once, capsys):
    greedy = generate(capsys, tiny_hf, "What is 2 + 3?")[1].splitlines()[-1]
    assert END_LINE.fullmatch(greedy), greedy
    res = json.loads(generate(capsys, tiny_hf, "What is 2 + 3?", "--json", *MULTI_ROW[sampler])[0])
    out, err = generate(capsys, tiny_hf, "What is 2 + 3?", *MULTI_ROW[sampler])
    end = END_LINE.fullmatch(err.splitlines()[-1])
    assert end, err
    assert int(end.group(1)) == res["tokens_generated"]  # every row's tokens, follow-ups and probes too
    assert end.group(4) == res["branches"][res["choice"]]["finish_reason"]
    assert not END_LINE.search(out)


@pytest.mark.parametrize("prompt, shown", [("Once upon a time", False), ("What is 2 + 3?", True)])
def test_branching_names_an_answer_only_for_a_question_with_one(prompt, shown, tiny_hf, cli_load_once, capsys):
    out, err = generate(capsys, tiny_hf, prompt, *MULTI_ROW["branching"])
    answer_lines = [line for line in err.splitlines() if line.startswith("answer:")]
    assert len(answer_lines) == (1 if shown else 0), err
    assert "answer:" not in out


@pytest.mark.parametrize("prompt, kind", [
    ("What is 2 + 3?", "number"),
    ("How many times does the letter r appear in the word strawberry?", "number"),
    ("Which is larger: 9.11 or 9.9?", "number"),
    ("Sort these numbers from smallest to largest: 3, 1, 2", "list"),
    ("What is the 3rd letter of the word cat?", "text"),
    ("Is 7 a prime number? Answer yes or no.", "text"),
    ("Which planet is largest?\n(A) Mars\n(B) Jupiter\n(C) Venus", "option"),
    ("Once upon a time", None),
    ("Write a poem about the sea.", None),
    ("What is the capital of France?", None),
])
def test_prompt_answer_format(prompt, kind):
    found = prompt_answer_format(prompt)
    assert (found and found[0]) == kind

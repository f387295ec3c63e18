"""One answer reader for users and the evaluation: `entropix generate --answer-format`, the API's
`answer_format` and `entropix eval` all get (kind, pattern) from `resolve_answer_format`."""

from __future__ import annotations

import json

import httpx
import pytest

from entropix.answer_format import (COMPARE_PATTERN, YESNO_PATTERN, AnswerFormatError, kind_pattern,
                                    question_options, resolve_answer_format)
from entropix.answers import extract_answer
from entropix.cli import main
from entropix.evaluate.runner import answer_kind
from entropix.evaluate.tasks import Problem, format_prompt, make_task
from entropix.evaluate.tasks.registry import TASKS
from entropix.serve import ServerThread, create_app
from entropix.serve.errors import APIError
from entropix.serve.protocol import ChatRequest, CompletionRequest, answer_format

from tinymodel import tiny_lm

YES_NO = "Is 9.11 larger than 9.9? Answer yes or no."


# -- the reader on the prompt's wording ---------------------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("What is 2 + 3?", ("number", None)),
    ("How many times does the letter r appear in the word strawberry?", ("number", None)),
    ("Write a poem about the sea.", ("number", None)),  # no format named: the strategies' default
    ("Sort these numbers from smallest to largest: 3.1, 1.2, 2", ("list", None)),
    ("What is the 3rd letter of the word cat?", ("text", None)),
    (YES_NO, ("text", YESNO_PATTERN)),
    ("A coin is heads up. Ann flips the coin. Is the coin still heads up?", ("text", YESNO_PATTERN)),
    ("Is it raining or not?", ("text", YESNO_PATTERN)),
    ("Which planet is largest?\n(A) Mars\n(B) Jupiter\n(C) Venus", ("option", None)),
    ("Which is larger: 9.9 or 9.11?", ("number", COMPARE_PATTERN)),
    ("Is 9.9 or 9.11 larger?", ("number", COMPARE_PATTERN)),
])
def test_the_reader_reads_the_prompts_wording(prompt, expected):
    assert resolve_answer_format(prompt) == expected


@pytest.mark.parametrize("prompt, options", [
    ("Which city is bigger, Paris or London?", ["Paris", "London"]),
    ("Is it red, green or blue?", ["red", "green", "blue"]),
    ("Which is heavier, a kilogram of feathers or a kilogram of steel?", ["kilogram of feathers", "kilogram of steel"]),
    ("Is 2 + 3 equal to 5 or 6?", ["5", "6"]),
    ("Which is larger: 1.5, 1.45 or 1.4?", ["1.5", "1.45", "1.4"]),
    ("Answer yes or no: is 7 prime?", []),
    ("What is the capital of France?", []),
])
def test_options_come_from_the_question(prompt, options):
    assert question_options(prompt) == options


@pytest.mark.parametrize("prompt, text, answer", [
    ("Which city is bigger, Paris or London?", "Paris has 2 million people; London is bigger.", "London"),
    ("Is 2 + 3 equal to 5 or 6?", "2 + 3 = 5, so it is 5.", "5"),  # the 2 and 3 are no options
    ("Is 9.9 or 9.11 larger?", "9.9 is larger than 9.11.", "9.9"),  # the stated winner, not the last number
    (YES_NO, "9.11 has more digits, but no, it is not larger.", "no"),
    ("Which planet is largest?\n(A) Mars\n(B) Jupiter", "The answer is (B).", "B"),
])
def test_what_the_reader_finds_in_an_output(prompt, text, answer):
    assert extract_answer(text, *resolve_answer_format(prompt)) == answer


def test_a_long_prompt_reads_in_linear_time():
    """The server reads every prompt: no wording regex may rescan the prompt from each of its words
    (200,000 characters of "(A) " took 79 s with the former "(A)[\\s\\S]*(B)" regex)."""
    import time

    for prompt in ("(A) " * 50_000, "which " * 35_000, "sort " * 40_000, "Which x: " + "a," * 100_000 + " z?",
                   "A. x\n" * 40_000, "is a or b? " * 20_000):
        t0 = time.perf_counter()
        resolve_answer_format(prompt)
        assert time.perf_counter() - t0 < 5, prompt[:20]


# -- a format the user names ------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("number", ("number", None)),
    ("list", ("list", None)),
    ("text", ("text", None)),
    ("yes-no", ("text", YESNO_PATTERN)),
    ("regex:final: (\\w+)", ("pattern", "final: (\\w+)")),
    ("option", ("option", None)),  # no options in the question: option letters
])
def test_a_given_format_wins_over_the_wording(given, expected):
    assert resolve_answer_format("What is 2 + 3?", given) == expected


def test_option_takes_the_questions_options():
    kind, pattern = resolve_answer_format("Do you prefer tea or coffee?", "option")
    assert kind == "pattern" and extract_answer("Coffee, then tea. I'd pick tea.", kind, pattern) == "tea"
    assert resolve_answer_format("Pick one.\n(A) x\n(B) y", "option") == ("option", None)


@pytest.mark.parametrize("bad, words", [
    ("numbers", "unknown answer format 'numbers'"),
    ("Yes-No", "unknown answer format"),
    ("regex:", "needs a pattern"),
    ("regex:(unclosed", "does not compile"),
    ("regex:x*", "matches the empty string"),
])
def test_bad_formats_are_one_line_errors(bad, words, capsys):
    with pytest.raises(AnswerFormatError, match=words):
        resolve_answer_format("What is 2 + 3?", bad)
    # On the command line: exit code 2 and one line, before any model loads.
    assert main(["generate", "What is 2 + 3?", "--sampler", "auto", "--answer-format", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("entropix: error: ") and words in err and "\n" not in err, err


def test_a_format_for_a_single_row_sampler_is_an_error(capsys):
    assert main(["generate", "What is 2 + 3?", "--sampler", "greedy", "--answer-format", "number"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--answer-format applies to the multi-row samplers" in err and "\n" not in err


def test_the_cli_hands_the_format_to_the_strategy(monkeypatch, capsys):
    import entropix.cli.generate as gen

    seen = []
    real_decode = gen.decode
    monkeypatch.setattr(gen, "load", lambda args, quiet=False: tiny_lm())
    monkeypatch.setattr(gen, "decode", lambda dec, task, *a: seen.append(task) or real_decode(dec, task, *a))
    assert main(["generate", "Is 2 + 3 equal to 5 or 6?", "--sampler", "cot", "--branches", "2",
                 "--max-tokens", "2", "--json"]) == 0
    assert main(["generate", "Is 2 + 3 equal to 5 or 6?", "--sampler", "cot", "--branches", "2",
                 "--max-tokens", "2", "--json", "--answer-format", "regex:(\\w)"]) == 0
    capsys.readouterr()
    assert [(t.kind, t.pattern) for t in seen] == [resolve_answer_format("Is 2 + 3 equal to 5 or 6?"),
                                                   ("pattern", "(\\w)")]


# -- the evaluation reads what a user would type ------------------------------------------------------

@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_evaluation_reads_each_tasks_prompt(task):
    """Each task's prompt states its format in words the reader understands: the decoder looks for
    what the task's own format would have told it, without being told."""
    for p in make_task(task, 40, 0):
        assert answer_kind(p) == resolve_answer_format(format_prompt(p))
        assert answer_kind(p) == kind_pattern(p.kind, p.extra.get("format"))


def test_the_evaluation_ignores_what_a_user_could_not_pass():
    # A problem's own pattern grades it, but the decoder reads the prompt only.
    p = Problem("x", "What is 2 + 3?", "5", "number", {"pattern": r"final: (\d+)"})
    assert answer_kind(p) == ("number", None)
    # A format the task adds to the prompt's words is read from those words.
    coin = Problem("c", "A coin is heads up. Is it still heads up?", "yes", "text", {"format": "yesno"})
    assert format_prompt(coin).endswith("Answer yes or no.") and answer_kind(coin) == ("text", YESNO_PATTERN)


# -- the server --------------------------------------------------------------------------------------

class _Tok:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _params(cls, **body):
    return cls.model_validate({"model": "m", **body})


def test_the_server_reads_the_last_user_message():
    msgs = [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": YES_NO}]
    assert answer_format(_params(ChatRequest, messages=msgs), _Tok()) == ("text", YESNO_PATTERN)
    assert answer_format(_params(ChatRequest, messages=msgs[:2]), _Tok()) == ("number", None)
    ids = [ord(c) for c in "Which is larger: 9.9 or 9.11?"]
    assert answer_format(_params(CompletionRequest, prompt=ids), _Tok()) == ("number", COMPARE_PATTERN)
    legacy = _params(CompletionRequest, prompt=YES_NO, answer_kind="text")  # the older field still works
    assert answer_format(legacy, _Tok()) == ("text", None)


def test_prompts_asking_for_different_formats_need_a_format():
    p = _params(CompletionRequest, prompt=["What is 2 + 3?", YES_NO])
    with pytest.raises(APIError) as e:
        answer_format(p, _Tok())
    assert e.value.status == 400 and e.value.param == "answer_format"
    given = _params(CompletionRequest, prompt=["What is 2 + 3?", YES_NO], answer_format="yes-no")
    assert answer_format(given, _Tok()) == ("text", YESNO_PATTERN)


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


@pytest.fixture(scope="module")
def http(tiny):
    with ServerThread(create_app(tiny, max_rows=16, max_n=8)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("extra, param, words", [
    ({"answer_format": "numbers"}, "answer_format", "unknown answer format"),
    ({"answer_format": "regex:("}, "answer_format", "does not compile"),
    ({"answer_format": "number", "answer_kind": "number"}, "answer_format", "not both"),
    ({"answer_format": "number", "sampler": "greedy"}, "answer_format", "sampler only"),
    ({"answer_kind": "number", "sampler": "greedy"}, "answer_kind", "sampler only"),
])
def test_bad_formats_are_400s(http, tiny, extra, param, words):
    rows = {} if "sampler" in extra else {"sampler": "cot", "branches": 2}
    body = {"model": tiny.name, "messages": [{"role": "user", "content": YES_NO}], "max_tokens": 2, **rows, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_value" and words in err["message"], err
    assert "\n" not in err["message"]


def test_a_good_format_decodes(http, tiny):
    body = {"model": tiny.name, "prompt": "Q: 2 + 3?", "max_tokens": 2, "sampler": "cot", "branches": 2,
            "answer_format": "regex:(\\S)"}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["answer"] is not None  # any non-space character is an answer under this pattern


# -- one answer, three ways: the CLI, the server and the evaluation, on the embedded model ----------------

MAX_TOKENS = 48


@pytest.mark.slow
def test_cli_server_and_evaluation_give_the_same_answer(capsys, tmp_path):
    """The default model in its default weight mode (no --quant), auto with its default branches,
    48 tokens, no seed (auto's rows are greedy from their first token)."""
    from entropix.cli import build_parser
    from entropix.cli.common import load
    from entropix.evaluate.runner import run_eval

    assert main(["generate", YES_NO, "--sampler", "auto", "--json", "--max-tokens", str(MAX_TOKENS)]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["answer"] in ("yes", "no"), cli["answer"]

    lm = load(build_parser().parse_args(["serve"]), quiet=True)  # what `entropix serve` loads by default
    with ServerThread(create_app(lm)) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        r = c.post("/v1/chat/completions", json={"model": "default", "sampler": "auto", "max_tokens": MAX_TOKENS,
                                                 "messages": [{"role": "user", "content": YES_NO}]})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == cli["answer"]

    # The evaluation's reader on the CLI's own branches: each branch's answer read again ...
    problem = Problem("yes-no", YES_NO, "no", "text")
    for b in cli["branches"]:
        assert extract_answer(b["text"], *answer_kind(problem)) == b["answer"]
    # ... and the evaluation decoding the same prompt with the same sampler.
    run_eval(lm, [problem], "auto", task="reader", out=tmp_path / "rows.jsonl", max_tokens=MAX_TOKENS,
             progress=False)
    row = json.loads((tmp_path / "rows.jsonl").read_text())
    assert row["prompt"] == YES_NO and row["decoder_answer"] == cli["answer"]

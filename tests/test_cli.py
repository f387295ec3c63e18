"""The command line: generate, JSON output, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from entropix.cli import main

from tiny import write_hf_model

ENTROPIX = str(Path(sys.executable).with_name("entropix"))


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory, gguf_path):
    """A tiny model with a 64-token context."""
    return write_hf_model(tmp_path_factory.mktemp("ctx") / "tiny", gguf_path, max_position_embeddings=64,
                          rope_scaling=None)


def run_cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, needle):
    assert rc != 0
    errors = [line for line in err.splitlines() if line.startswith("entropix: error:")]
    assert len(errors) == 1, err
    assert needle in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["generate", "hi", "--model", "/no/such/file.gguf"], "no such model"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--top-k", "-2"], "top_k"),
    (["generate", "hi", "--min-p", "3"], "min_p"),
    (["generate", "hi", "--max-tokens", "0"], "max-tokens"),
    (["generate", "hi", "--sampler", "bogus"], "unknown sampler"),
    (["generate", "hi", "--dtype", "int3"], "dtype"),
    (["generate", "hi", "--backend", "tpu-magic"], "backend"),
    (["generate", "hi", "--sampler", "cot", "--branches", "0"], "--branches"),
])
def test_bad_input_one_line(args, needle, capsys):
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, needle)


def test_truncated_gguf_one_line(tmp_path, gguf_path, capsys):
    bad = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    rc, _, err = run_cli(["generate", "hi", "--model", str(bad)], capsys)
    assert_one_line_error(rc, err, "truncated")


def test_non_llama_one_line(tmp_path, tiny_short, capsys):
    folder = tmp_path / "m"
    shutil.copytree(tiny_short, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(["generate", "hi", "--model", str(folder)], capsys)
    assert_one_line_error(rc, err, "architecture")


def test_prompt_longer_than_context(tiny_short, capsys):
    rc, _, err = run_cli(["generate", "word " * 200, "--model", str(tiny_short), "--raw"], capsys)
    assert_one_line_error(rc, err, "context")


def test_generation_stops_at_context_end(tiny_short, capsys):
    rc, out, _ = run_cli(["generate", "word " * 40, "--model", str(tiny_short), "--backend", "torch", "--raw",
                          "--json", "--max-tokens", "500"], capsys)
    assert rc == 0
    res = json.loads(out)
    assert res["finish_reason"] in ("length", "stop")
    assert res["usage"]["prompt_tokens"] + res["usage"]["completion_tokens"] <= 64


@pytest.mark.slow
def test_generate_json_on_embedded_model(cli_load_once, capsys):
    rc, out, _ = run_cli(["generate", "What is the capital of France?", "--json", "--max-tokens", "24"], capsys)
    assert rc == 0
    res = json.loads(out)
    for key in ("text", "tokens", "finish_reason", "usage", "records"):
        assert key in res
    assert len(res["records"]) == len(res["tokens"]) == res["usage"]["completion_tokens"]
    assert "".join(r["text"] for r in res["records"]) == res["text"]
    assert all({"token", "text", "logprob"} <= set(r) for r in res["records"])
    assert "Paris" in res["text"]


@pytest.mark.slow
def test_same_seed_same_text(cli_load_once, capsys):
    args = ["generate", "Tell me a fact about cats.", "--json", "--max-tokens", "8", "--temperature", "0.9",
            "--seed", "7"]
    a = json.loads(run_cli(args, capsys)[1])["tokens"]
    b = json.loads(run_cli(args, capsys)[1])["tokens"]
    c = json.loads(run_cli(args[:-1] + ["8"], capsys)[1])["tokens"]
    assert a == b
    assert a != c


def user_env() -> dict[str, str]:
    """This environment less the ENTROPIX_* variables: the console script runs a user's defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ENTROPIX_")}


@pytest.fixture(scope="module")
def console_chat():
    """One run of the installed console script: `chat` over stdin, two turns then /quit, under the
    defaults. It streams each answer as `generate` does (the README's `generate` lines stream to a pipe
    in tests/test_readme_commands.py); this is the one run of the script itself that loads the model."""
    return subprocess.run([ENTROPIX, "chat", "--max-tokens", "4"], input="Hello!\nWhat did I just say?\n/quit\n",
                          capture_output=True, text=True, env=user_env(), timeout=300)


@pytest.mark.slow
def test_console_script_streams_and_exits_cleanly(console_chat, tmp_path):
    p = console_chat
    assert p.returncode == 0, p.stderr
    replies = p.stdout.split(">>> ")[1:-1]  # the model's text streamed after each prompt
    assert len(replies) == 2 and all(r.strip() for r in replies), p.stdout
    p = subprocess.run([ENTROPIX, "generate", "hi", "--model", str(tmp_path / "none")], capture_output=True,
                       text=True, env=user_env(), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("entropix: error:")


@pytest.mark.slow
def test_chat_multi_turn_over_stdin(console_chat):
    p = console_chat
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(">>> ") >= 3  # three prompts shown: two turns answered, then /quit


def test_download_offline_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    rc, _, err = run_cli(["download", "HuggingFaceTB/SmolLM2-360M-Instruct"], capsys)
    assert_one_line_error(rc, err, "SmolLM2-360M-Instruct")

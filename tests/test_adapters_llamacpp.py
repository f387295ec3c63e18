"""The llama.cpp adapter (llama-cpp-python): records, greedy parity, the logits processor.

These run where llama-cpp-python is installed (`make install-llamacpp`; CI installs it)
and are skipped only where the package is absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from entropix import EntropixError
from entropix.sampler.config import load_profile
from entropix.sampler.policy import ENTROPIX_STATES, Entropix, Greedy

pytestmark = pytest.mark.slow  # an engine adapter: llama.cpp (make test-fast leaves it out)

HAVE = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE, reason="llama-cpp-python is not installed (make install-llamacpp)")
PROMPT = "Write a story about a robot who learns to paint."


@pytest.fixture(scope="module")
def model():
    from entropix.adapters import llamacpp

    return llamacpp.load(None, n_ctx=1024)  # the embedded GGUF


def _ids(model):
    return model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])


def _engine_tokens(model, policy, n, seed=None):
    from entropix.decode.engine import generate
    from entropix.decode.records import Request

    req = Request(prompt=_ids(model), policy=policy, max_tokens=n, seed=seed, stop_ids=model.tokenizer.stop_ids)
    return list(generate(model.engine(), [req]))


def _own(model, n, **kw):
    model.llm.reset()  # no prefix reuse from an earlier run: the same prompt evaluation as ours
    out = []
    for tok in model.llm.generate(_ids(model), temp=0.0, **kw):
        out.append(int(tok))
        if len(out) == n or tok in model.tokenizer.stop_ids:
            break
    return out


@needs_llama
def test_cli_llamacpp_entropix_records_have_metrics(capsys):
    from entropix import cli

    argv = ["generate", PROMPT, "--engine", "llama.cpp", "--sampler", "entropix", "--seed", "3", "--max-tokens", "24",
            "--json"]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    recs = res["records"]
    assert len(recs) == len(res["tokens"]) > 0 and res["sampler"] == "entropix"
    for r in recs:
        assert r["entropy"] >= 0 and r["varentropy"] >= 0 and 0 <= r["margin"] <= 1
        assert r["state"] in ENTROPIX_STATES and "attn_entropy" not in r  # logits only: no attention metrics
        assert len(r["top"]) == 5
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == res["tokens"]  # seeded: reproducible


@needs_llama
def test_greedy_through_our_engine_is_llamacpp_greedy(model):
    ours = [r.token for r in _engine_tokens(model, Greedy(), 48)]
    assert len(ours) == 48
    assert ours == _own(model, 48)


@needs_llama
def test_logits_processor_inside_llamacpp_generate_matches_the_driver(model):
    from llama_cpp import LogitsProcessorList

    from entropix.adapters.llamacpp import EntropixLogitsProcessor

    cfg = load_profile(model.name)
    pid = model.tokenizer.find_token(cfg.pause_text)
    want = _engine_tokens(model, Entropix(cfg, pid, attention=False), 32, seed=9)
    proc = EntropixLogitsProcessor(cfg, seed=9, pause_id=pid)
    got = _own(model, len(want), logits_processor=LogitsProcessorList([proc]))
    assert got == [r.token for r in want]
    assert [s for _, s in proc.sampler.history] == [r.state for r in want]
    assert len({r.state for r in want}) >= 2  # not all argmax: the sampler really chose


@needs_llama
def test_llamacpp_engine_refuses_what_it_cannot_do(capsys):
    from entropix import cli

    for extra in (["--sampler", "cot"], ["--sampler", "entropix", "--branching"], ["--sampler", "self-consistency"]):
        assert cli.main(["generate", "hi", "--engine", "llama.cpp", "--max-tokens", "2"] + extra) == 2
        assert "decodes one row" in capsys.readouterr().err


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, capsys):
    from entropix import cli

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if absent
    assert cli.main(["generate", "hi", "--engine", "llama.cpp", "--max-tokens", "2"]) == 2
    assert "llama-cpp-python" in capsys.readouterr().err


def test_llamacpp_engine_needs_a_gguf(tmp_path, capsys):
    from entropix.adapters import llamacpp

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EntropixError):
        llamacpp.load(str(tmp_path))

"""The per-token decision is a "regime" everywhere it is shown; "state" stays readable as its older name.

Records (`generate --json`, the server's per-token `entropix` entries) carry `regime` and the
`state` alias with equal values; the catalogue lists `regimes` (and `states`); the CLI's summary
line says `regimes:`. Tiny in-memory models only: a few seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

import entropix.cli.generate as generate_cli
from entropix.cli import main
from entropix.sampler import catalog
from entropix.sampler.dslider import DSLIDER_REGIMES, DSlider
from entropix.sampler.lookahead import LOOKAHEAD_REGIMES, Lookahead
from entropix.sampler.policy import ENTROPIX_REGIMES, Entropix
from entropix.serve import ServerThread, create_app

from tinymodel import tiny_lm

STATIC = Path(__file__).resolve().parents[1] / "src" / "entropix" / "static"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture
def cli_tiny(monkeypatch, lm):
    monkeypatch.setattr(generate_cli, "load", lambda args, quiet=False: lm)


def test_policies_and_catalogue_name_regimes():
    assert Entropix.regimes == ENTROPIX_REGIMES and DSlider.regimes == DSLIDER_REGIMES
    assert Lookahead.regimes == LOOKAHEAD_REGIMES
    assert catalog.spec("entropix").regimes == ENTROPIX_REGIMES
    for s in catalog.describe(listed_only=False):
        assert s["regimes"] == s["states"] == list(catalog.spec(s["name"]).regimes), s["name"]


def test_generate_json_records_carry_regime_and_state(cli_tiny, capsys):
    rc = main(["generate", "--sampler", "entropix", "--seed", "3", "--max-tokens", "6", "--json", "hi"])
    assert rc == 0
    recs = json.loads(capsys.readouterr().out)["records"]
    assert recs and all(r["regime"] == r["state"] and r["regime"] in ENTROPIX_REGIMES for r in recs)


def test_generate_summary_line_says_regimes(cli_tiny, capsys):
    rc = main(["generate", "--sampler", "entropix", "--seed", "3", "--max-tokens", "6", "hi"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "legend:" in err and "\nregimes: " in err and "strategies:" not in err


def test_server_entries_and_info_carry_regime_and_state(lm):
    with ServerThread(create_app(lm, max_rows=4, max_n=2)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": lm.name, "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 3, "seed": 3, "sampler": "entropix"})
        assert r.status_code == 200, r.text
        entries = r.json()["choices"][0]["entropix"]
        assert entries and all(e["regime"] == e["state"] and e["regime"] in ENTROPIX_REGIMES for e in entries)
        specs = {s["name"]: s for s in http.get("/v1/entropix/info").json()["sampler_specs"]}
        assert specs["entropix"]["regimes"] == specs["entropix"]["states"] == list(ENTROPIX_REGIMES)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_chat_page_reads_regime_and_older_state():
    """chat-stream.js keeps [text, regime, ...] from either field name (slot 1, as stored before)."""
    script = (STATIC / "chat-stream.js").read_text(encoding="utf-8") + """
    const run = new window.ChatStream.Run();
    run.feed({choices: [{index: 0, delta: {content: "ab"}, entropix: [
      {index: 0, text: "a", regime: "branch", state: "branch", entropy: 1, varentropy: 2, logprob: 0},
      {index: 1, text: "b", state: "flowing", entropy: 0, varentropy: 0, logprob: 0},
      {index: 2, text: "", regime: "adaptive", entropy: 0, varentropy: 0, logprob: 0}]}]});
    console.log(JSON.stringify(run.shown().tokens.map((t) => t[1])));
    """
    out = subprocess.run(["node", "-e", "globalThis.window = globalThis;\n" + script], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["branch", "flowing", "adaptive"]

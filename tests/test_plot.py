"""`entropix plot`: a PNG from a `generate --json` run, and clear errors for bad input."""

from __future__ import annotations

import json
import struct

import pytest

from entropix import EntropixError
from entropix.cli import main
from entropix.sampler.config import SamplerConfig
from entropix.plots.tokens import read_run, regions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_json(tmp_path_factory, smol):
    """A real run of the entropix sampler on the embedded model (fp32: the session's `smol`), as
    `generate --json` writes it."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
        mp.setattr("entropix.cli.generate.load", lambda args, quiet=False: smol)
        rc = main(["generate", "--sampler", "entropix", "--seed", "11", "--json", "--max-tokens", "24",
                   "--quant", "none", "--dtype", "float32", "--device", "cpu",
                   "How many times does the letter r appear in strawberry?"])
    assert rc == 0
    path = tmp_path_factory.mktemp("plot") / "run.json"
    path.write_text(buf.getvalue())
    return path


@pytest.mark.slow
def test_plot_writes_a_png_from_a_generate_run(run_json, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["plot", str(run_json), "-o", str(out)]) == 0
    w, h = png_size(out)
    assert w >= 600 and h >= 600
    import matplotlib.image as mpimg

    img = mpimg.imread(out)  # decodes: a valid image, not just a header
    assert img.shape[0] == h and img.shape[1] == w
    assert img[..., :3].std() > 0.05  # something was drawn
    assert "wrote" in capsys.readouterr().err


@pytest.mark.slow
def test_plot_with_a_profile_and_default_output_name(run_json, tmp_path):
    prof = tmp_path / "prof.json"
    SamplerConfig(model="x", low_ent=0.5, low_vent=1.0, med_ent=2.0, high_ent=4.0, med_vent=6.0,
                  high_vent=9.0).to_json(prof)
    copy = tmp_path / "again.json"
    copy.write_text(run_json.read_text())
    assert main(["plot", str(copy), "--sampler-config", str(prof)]) == 0
    png_size(tmp_path / "again.png")


def _synthetic(tmp_path, records, name="syn.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"model": "smollm2-135m", "sampler": "entropix", "prompt": "hi", "records": records}))
    return p


def test_plot_synthetic_run_with_every_state(tmp_path):
    states = ["flowing", "treading", "pause", "branch", "resample", "adaptive", "greedy"]
    recs = [{"entropy": 0.5 * i, "varentropy": 1.7 * i, "state": s} for i, s in enumerate(states)]
    out = tmp_path / "syn.png"
    assert main(["plot", str(_synthetic(tmp_path, recs)), "-o", str(out)]) == 0
    png_size(out)


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "hello"}), "no per-token records"),
    (json.dumps({"records": [{"entropy": 1.0}]}), "record 0 lacks"),
    (json.dumps({"records": [{"entropy": "x", "varentropy": 1}]}), "record 0 lacks"),
])
def test_plot_bad_input_gives_a_one_line_error(tmp_path, capsys, content, words):
    p = tmp_path / "bad.json"
    if content is not None:
        p.write_text(content)
    assert main(["plot", str(p), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("entropix: error:") and words in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(EntropixError):
        read_run(p)


def test_regions_follow_the_thresholds():
    cfg = SamplerConfig(low_ent=1, low_vent=2, med_ent=3, high_ent=5, med_vent=4, high_vent=8)
    r = regions(cfg, 10, 20)
    assert r["flowing"] == [(0.0, 0.0, 1, 2)]
    assert r["treading"] == [(5, 0.0, 10, 4)]
    assert r["branch"] == [(0.0, 8, 3, 20)]
    assert (3, 8, 5, 20) in r["resample"]

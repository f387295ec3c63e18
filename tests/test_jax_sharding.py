"""The JAX backend on 4 forced host devices: TP=4 and TP=2 x DP=2 equal one device, the
weights are really split, and the CLI's sharded runs equal its one-device run. XLA_FLAGS
must be set before jax is imported, so the work runs in a fresh Python process
(tests/jax_mesh_check.py), one for both tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny import write_hf_model

pytestmark = pytest.mark.slow  # a fresh Python process on 4 forced host devices (make test-fast leaves it out)


HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory, gguf_path) -> dict:
    """Both parts of tests/jax_mesh_check.py. The CLI's checkpoint splits over tp as the embedded
    model does (GQA 3: 9 heads and 3 key/value heads of 8, so TP=4 cuts heads in the middle and
    leaves the cache's heads whole; tied embeddings: the vocabulary split is also the output's)."""
    folder = write_hf_model(tmp_path_factory.mktemp("mesh") / "tiny", gguf_path, hidden_size=72,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(HERE / "jax_mesh_check.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tp4_and_tp2_dp2_equal_one_device_and_split_the_weights(mesh_runs):
    res = mesh_runs["tiny"]
    one = res["tp1_dp1"]
    assert one["devices"] == 1
    for name in ("tp4_dp1", "tp2_dp2"):
        r = res[name]
        assert r["devices"] == 4
        assert r["tokens"] == one["tokens"], name
        for a, b in zip(r["logits"], one["logits"]):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(r["attn"]), np.array(one["attn"]), atol=1e-4, rtol=0)
    # hidden 64, 8 heads x 8, 4 key/value heads, vocab 256; one device holds every weight whole
    assert one["shards"]["q_proj"] == [[64, 64]]
    tp4, tp2 = res["tp4_dp1"]["shards"], res["tp2_dp2"]["shards"]
    assert tp4["q_proj"] == [[16, 64]] * 4  # output features over tp
    assert tp4["down_proj"] == [[64, 40]] * 4  # input features over tp (160 / 4)
    assert tp4["embed_tokens"] == [[64, 64]] * 4  # the vocabulary over tp
    assert tp2["q_proj"] == [[32, 64]] * 4  # split in two, each half on both dp devices
    # the KV cache [B, S, Hkv, D]: heads over tp, rows (4 padded) over dp
    assert tp4["cache_k"] == [[4, 256, 1, 8]] * 4
    assert tp2["cache_k"] == [[2, 256, 2, 8]] * 4


def test_cli_tp4_and_tp2_dp2_equal_one_device(mesh_runs):
    """16 greedy tokens of `entropix generate --backend jax --tp/--dp` and their logprobs, on the
    tiny checkpoint split as the embedded model would be (whose 30 layers take seconds to compile
    per program and per mesh: its one-device smoke test is in tests/test_jax_e2e.py)."""
    res = mesh_runs["cli"]
    one = res["tp1_dp1"]
    assert one["rc"] == 0 and len(one["tokens"]) >= 8
    # the flags reached the mesh: q_proj [72, 72] whole, in 4 (2.25 heads each), in 2 on both dp devices
    assert (one["q_proj"], res["tp4_dp1"]["q_proj"], res["tp2_dp2"]["q_proj"]) == ([[72, 72]], [[18, 72]] * 4,
                                                                                  [[36, 72]] * 4)
    for name in ("tp4_dp1", "tp2_dp2"):
        assert res[name]["rc"] == 0
        assert res[name]["tokens"] == one["tokens"], name
        np.testing.assert_allclose(res[name]["logprobs"], one["logprobs"], atol=1e-4, rtol=0)

"""Run by tests/test_jax_sharding.py in a fresh process: XLA's forced host devices must be
set before jax is imported, and a pytest process has usually imported it already.

`python tests/jax_mesh_check.py FOLDER` prints one JSON object with two parts, one process
start for both (importing jax and torch is a good part of the cost):
  "tiny": a ragged batch decoded on a tiny in-memory model (8 heads, 4 key/value heads: every
          split is even) on 1 device, TP=4 and TP=2 x DP=2: tokens, logits and the shapes of
          a few weights' addressable shards per mesh;
  "cli":  `entropix generate --backend jax --json` on the checkpoint in FOLDER per mesh.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

MESHES = ((1, 1), (4, 1), (2, 2))  # (tp, dp)


def tiny() -> dict:
    import numpy as np

    from entropix.backends.base import SampleGroup
    from entropix.backends.jax.backend import JaxBackend
    from entropix.sampler.policy import Greedy
    from jax_helpers import jax_twin
    from tinymodel import tiny_lm

    lm = tiny_lm(seed=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    out = {}
    for tp, dp in MESHES:
        jl = jax_twin(lm, tp=tp, dp=dp)
        layer = jl.model.params["layers"][0]
        weights = {"q_proj": layer["self_attn"]["q_proj"], "down_proj": layer["mlp"]["down_proj"],
                   "embed_tokens": jl.model.params["embed_tokens"]}
        shards = {k: [list(s.data.shape) for s in w.addressable_shards] for k, w in weights.items()}
        b = JaxBackend(jl.model)
        b.prefill([[5, 6, 7], list(range(40, 60)), [9] * 11], [1, 2, 1], True)
        cache = b.state[0][0][0]
        shards["cache_k"] = [list(s.data.shape) for s in cache.addressable_shards]
        tokens, logits = [], []
        for _ in range(8):
            h = b.sample([SampleGroup(Greedy(), tuple(range(b.rows)))], 2)
            logits.append(np.asarray(b.state[1])[:b.rows].tolist())
            tokens.append(h.token.tolist())
            b.advance(h.token.tolist(), True)
        out[f"tp{tp}_dp{dp}"] = {"devices": int(jl.model.mesh.devices.size), "shards": shards, "tokens": tokens,
                                 "logits": logits, "attn": h.attn.tolist()}
    return out


def cli(folder: str) -> dict:
    from entropix.cli import generate, main

    loaded = []

    def load(args, quiet=False):  # the CLI's own load, its model kept to read the mesh it built
        loaded.append(real(args, quiet))
        return loaded[-1]

    real, generate.load = generate.load, load
    out = {}
    for tp, dp in MESHES:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["generate", "What is 2 + 3?", "--model", folder, "--backend", "jax", "--device", "cpu",
                       "--dtype", "float32", "--tp", str(tp), "--dp", str(dp), "-n", "16", "--json",
                       "--top-logprobs", "1"])
        res = json.loads(buf.getvalue())
        q_proj = loaded[-1].model.params["layers"][0]["self_attn"]["q_proj"]
        out[f"tp{tp}_dp{dp}"] = {"rc": rc, "tokens": res["tokens"], "logprobs": [r["logprob"] for r in res["records"]],
                                 "q_proj": [list(s.data.shape) for s in q_proj.addressable_shards]}
    return out


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax

    assert len(jax.devices()) == 4, jax.devices()
    sys.stdout.write(json.dumps({"tiny": tiny(), "cli": cli(sys.argv[1])}) + "\n")

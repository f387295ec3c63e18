"""Our forward over mlx-lm's modules equals mlx-lm's own forward, for each architecture the
mlx backend accepts (tiny random models built in memory), with rows ragged in a batch."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest

from entropix.backends.mlx.cache import RowCache
from entropix.backends.mlx.model import check_structure, forward

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4, rms_norm_eps=1e-5,
            vocab_size=300, num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    "llama": dict(head_dim=16, tie_word_embeddings=False, rope_theta=500000.0),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=10000.0),
    "qwen3": dict(head_dim=16, tie_word_embeddings=False, rope_theta=10000.0),
    "deepseek": dict(rope_theta=10000.0),
}


def tiny(arch: str):
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(0)
    model = mod.Model(mod.ModelArgs(model_type=arch, **BASE, **ARCHS[arch]))
    check_structure(model, arch)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_our_forward_equals_mlx_lm_on_each_row(arch):
    mx.set_default_device(mx.cpu)
    model = tiny(arch)
    prompts = [[3, 17, 42, 99, 250, 7], [5], [8, 9, 10]]
    P = max(map(len, prompts))
    toks = mx.array([[0] * (P - len(p)) + p for p in prompts])
    cache = RowCache(BASE["num_hidden_layers"], 3, [P - len(p) for p in prompts])
    first, _ = forward(model, toks, cache, (-1,))
    second, stats = forward(model, mx.array([[11], [12], [13]]), cache, (-1,))
    for i, p in enumerate(prompts):
        ref = model(mx.array([p + [11 + i]]))[0].astype(mx.float32)
        np.testing.assert_allclose(np.array(first[i]), np.array(ref[-2]), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(second[i]), np.array(ref[-1]), atol=1e-4, rtol=0)
    assert np.isfinite(np.array(stats[1].entropy)).all()

"""`entropix plan`: per-device figures against hand calculations from the published configs."""

from __future__ import annotations

import json

import pytest

from entropix import EntropixError
from entropix.cli import main
from entropix.plan import BUILTIN, parse_devices, plan, rank_count, split_heads, total_params

GIB = 1 << 30


def _cli_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_llama_70b_on_8_h100(capsys):
    p = _cli_json(capsys, "--model", "llama-3.1-70b", "--devices", "8xH100-80GB", "--dtype", "bf16")
    # Llama-3.1-70B: hidden 8192, ffn 28672, 80 layers, 64 query / 8 KV heads of 128, vocab 128256, untied
    C, F, L, D, V = 8192, 28672, 80, 128, 128256
    attn = 2 * C * (64 // 8) * D + 2 * C * (8 // 8) * D  # q + o (8 heads), k + v (1 KV head) per rank
    mlp = 3 * C * (F // 8)
    per_rank = L * (attn + mlp + 2 * C) + 2 * (V // 8) * C + C  # norms whole; embedding + head by vocab rows
    assert per_rank == 8_820_367_360
    tp8 = next(o for o in p["options"] if o["tp"] == 8)
    assert tp8["weight_bytes"] == per_rank * 2  # bf16: 16.43 GiB
    assert tp8["kv_bytes_per_token"] == 2 * L * 1 * D * 2  # k and v, 80 layers, one KV head, bf16 = 40960
    assert tp8["kv_bytes_per_1k"] == 40960 * 1024
    room = int(80 * GIB * 0.9) - per_rank * 2
    assert tp8["kv_tokens"] == room // 40960 and tp8["batch_at_context"] == room // 40960 // 131072
    assert p["params"] == 70_553_706_496  # the published 70.6B
    tp1 = next(o for o in p["options"] if o["tp"] == 1)
    assert not tp1["fits"] and tp1["kv_bytes_per_token"] == 327680  # 320 KiB per token on one device
    assert p["recommended_tp"] == 4  # TP=2 leaves 41k tokens; TP=4 leaves over half the memory to the cache


def test_llama_405b_on_16_h100(capsys):
    p = _cli_json(capsys, "--model", "meta-llama/Llama-3.1-405B-Instruct", "--devices", "16xH100-80GB")
    C, F, L, D, V = 16384, 53248, 126, 128, 128256
    # 16 ranks, 8 KV heads: each rank has 8 query heads, which all read one KV head (held by two ranks)
    attn = 2 * C * 8 * D + 2 * C * 1 * D
    per_rank = L * (attn + 3 * C * (F // 16) + 2 * C) + 2 * (V // 16) * C + C
    tp16 = next(o for o in p["options"] if o["tp"] == 16)
    assert tp16["weight_bytes"] == per_rank * 2
    assert tp16["kv_bytes_per_token"] == 2 * L * D * 2 == 64512
    assert 405e9 < p["params"] < 406e9
    assert p["recommended_tp"] == 16  # TP=8 needs 94.5 GiB per device
    assert not next(o for o in p["options"] if o["tp"] == 8)["fits"]


def test_deepseek_v2_counts_experts_and_latent_cache():
    cfg = BUILTIN["deepseek-v2"]
    assert 235e9 < total_params(cfg) < 237e9  # the published 236B
    one = rank_count(cfg, 1, 0)
    assert one.kv_per_token == (512 + 64) * 60  # the cached latent, every layer
    eight = rank_count(cfg, 8, 0)
    assert eight.kv_per_token == one.kv_per_token  # the latent is whole on every rank
    C = 5120  # whole on every rank: q/kv down projections and their norms, layer norms, routers, final norm
    whole = 60 * (C * 1536 + 1536 + C * (512 + 64) + 512 + 2 * C) + 59 * 160 * C + C
    assert eight.params == (one.params - whole) // 8 + whole  # everything else splits evenly over 8


def test_split_heads_keeps_each_query_with_its_kv_head():
    for H, Hkv, world in [(9, 3, 2), (9, 3, 4), (64, 8, 8), (128, 8, 16), (4, 2, 4), (32, 8, 3)]:
        seen = []
        for r in range(world):
            (lo, hi), kv = split_heads(H, Hkv, world, r)
            seen += range(lo, hi)
            group, local_group = H // Hkv, (hi - lo) // len(kv)
            assert (hi - lo) % len(kv) == 0
            for i, h in enumerate(range(lo, hi)):  # local query head i reads local KV head i // local_group
                assert kv[i // local_group] == h // group
        assert seen == list(range(H))


def test_bad_input_is_one_line(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--devices", "8xH100"]) == 2
    assert "expected COUNTxNAME-SIZEGB" in capsys.readouterr().err
    assert main(["plan", "--model", "no-such-model", "--devices", "8xH100-80GB"]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(EntropixError, match="dtype"):
        plan(BUILTIN["llama-3.1-8b"], 1, 80 * GIB, dtype="fp7")
    assert parse_devices("2xA100-40GB") == (2, "A100-40GB", 40 * GIB)


def test_text_report_marks_the_recommendation(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--devices", "2xL40S-48GB"]) == 0
    out = capsys.readouterr().out
    assert "<- recommended" in out and "8.03B parameters" in out

"""`entropix plan`: per-device figures against hand calculations from the published configs."""

from __future__ import annotations

import json

import pytest

from entropix import EntropixError
from entropix.cli import main
from entropix.plan import BUILTIN, parse_devices, plan, rank_count, split_heads, total_params
from entropix.plan_tpu import TpuSlice, parse_slice, tpu_plan

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


# -- TPU slices: the JAX backend's sharding (backends/jax/sharding.py) ------------------------

def _mesh(p: dict, tp: int) -> dict:
    return next(o for o in p["options"] if o["tp"] == tp)


def test_llama_405b_on_v4_64(capsys):
    p = _cli_json(capsys, "--model", "llama-3.1-405b", "--devices", "v4-64")
    # v4-64: 64 TensorCores, 2 per chip -> 32 chips; 4 chips per host -> 8 hosts; 32 GiB HBM per chip
    assert (p["chips"], p["hosts"], p["chips_per_host"], p["hbm_per_chip"]) == (32, 8, 4, 32 * GIB)
    C, F, L, H, Hkv, D, V = 16384, 53248, 126, 128, 8, 128, 128256
    # tp=32 divides every split dimension: q/o 128*128 = 16384 -> 512, k/v 8*128 = 1024 -> 32,
    # ffn 53248 -> 1664, vocab 128256 -> 4008; the norms stay whole
    assert (H * D % 32, Hkv * D % 32, F % 32, V % 32) == (0, 0, 0, 0)
    assert (H * D // 32, Hkv * D // 32, F // 32, V // 32) == (512, 32, 1664, 4008)
    per_chip = L * (2 * C * 512 + 2 * C * 32 + 3 * C * 1664 + 2 * C) + 2 * 4008 * C + C
    assert per_chip == 16384 * 774349 == 12_686_934_016
    tp32 = _mesh(p, 32)
    assert tp32["dp"] == 1 and tp32["weight_bytes"] == per_chip * 2  # 23.63 GiB in bf16
    assert tp32["weight_bytes_per_host"] == 4 * per_chip * 2
    # 32 does not divide the 8 KV heads: every chip caches all of them
    assert tp32["kv_heads_per_chip"] == 8
    assert tp32["kv_bytes_per_token"] == 2 * L * 8 * D * 2 == 516096  # 504 KiB
    assert tp32["kv_bytes_per_1k"] == 516096 * 1024
    room = int(32 * GIB * 0.9) - per_chip * 2  # 30_923_764_531 - 25_373_868_032
    assert room == 5_549_896_499
    assert tp32["kv_tokens_per_replica"] == tp32["kv_tokens"] == room // 516096 == 10753
    assert tp32["rows_at_context"] == 0 and tp32["fits"]
    tp8 = _mesh(p, 8)  # 8 divides the KV heads: one per chip, but 94.5 GiB of weights per chip
    assert tp8["kv_bytes_per_token"] == 2 * L * 1 * D * 2 == 64512 and not tp8["fits"]
    assert not _mesh(p, 16)["fits"]  # 47.25 GiB
    assert (p["recommended_tp"], p["recommended_dp"]) == (32, 1)
    assert p["weight_bytes_total"] == p["params"] * 2 and p["kv_bytes_per_token_total"] == 2 * L * Hkv * D * 2


def test_llama_70b_on_v4_16(capsys):
    p = _cli_json(capsys, "--model", "llama-3.1-70b", "--devices", "v4-16")
    assert (p["chips"], p["hosts"], p["chips_per_host"]) == (8, 2, 4)
    C, F, L, D, V = 8192, 28672, 80, 128, 128256
    # tp=8: q/o 64*128 = 8192 -> 1024, k/v 8*128 = 1024 -> 128, ffn 28672 -> 3584, vocab -> 16032
    assert (64 * D // 8, 8 * D // 8, F // 8, V // 8) == (1024, 128, 3584, 16032) and V % 8 == 0
    per_chip = L * (2 * C * 1024 + 2 * C * 128 + 3 * C * 3584 + 2 * C) + 2 * 16032 * C + C
    assert per_chip == 8_820_367_360  # as torch's TP=8 split: every dimension divides
    tp8 = _mesh(p, 8)
    assert (tp8["dp"], tp8["weight_bytes"], tp8["kv_heads_per_chip"]) == (1, per_chip * 2, 1)
    assert tp8["kv_bytes_per_token"] == 2 * L * 1 * D * 2 == 40960
    tokens = (int(32 * GIB * 0.9) - per_chip * 2) // 40960  # 13_283_029_811 bytes left
    assert tokens == 324_292 and tp8["kv_tokens"] == tokens and tp8["rows_at_context"] == 2
    # a host has 4 of the replica's 8 chips: 4 x 40 KiB of each token, and all the replica's tokens
    assert tp8["kv_bytes_per_token_host"] == 4 * 40960 and tp8["kv_tokens_per_host"] == tokens
    assert not _mesh(p, 4)["fits"]  # 32.86 GiB per chip
    assert (p["recommended_tp"], p["recommended_dp"]) == (8, 1)


def test_llama_70b_does_not_fit_v5e_8(capsys):
    p = _cli_json(capsys, "--model", "llama-3.1-70b", "--devices", "v5litepod-8")
    assert (p["slice"], p["chips"], p["hosts"], p["chips_per_host"], p["hbm_per_chip"]) == ("v5e-8", 8, 1, 8, 16 * GIB)
    total = 70_553_706_496 * 2  # 131.42 GiB of bf16 weights
    assert p["weight_bytes_total"] == total and total > 8 * 16 * GIB
    assert _mesh(p, 8)["weight_bytes"] == 8_820_367_360 * 2 > 16 * GIB  # 16.43 GiB on each chip
    assert not any(o["fits"] for o in p["options"]) and p["recommended_tp"] is None
    assert main(["plan", "--model", "llama-3.1-70b", "--devices", "v5e-8"]) == 0
    assert "no mesh fits" in capsys.readouterr().out


def test_v6e_8_host_holds_several_replicas(capsys):
    p = _cli_json(capsys, "--model", "llama-3.1-70b", "--devices", "v6e-8")
    assert (p["chips"], p["hosts"], p["chips_per_host"], p["hbm_per_chip"]) == (8, 1, 8, 32 * GIB)
    assert (p["recommended_tp"], p["recommended_dp"]) == (8, 1)
    p = _cli_json(capsys, "--model", "llama-3.1-8b", "--devices", "v6e-8")
    C, F, L, D = 4096, 14336, 32, 128
    usable = int(32 * GIB * 0.9)  # 30_923_764_531
    # tp=2: q/o 32*128 -> 2048, k/v 1024 -> 512, ffn -> 7168, vocab -> 64128; 4 KV heads per chip
    per_chip = L * (2 * C * 2048 + 2 * C * 512 + 3 * C * (F // 2) + 2 * C) + 2 * 64128 * C + C
    tp2 = _mesh(p, 2)
    assert tp2["weight_bytes"] == per_chip * 2 and tp2["kv_bytes_per_token"] == 2 * L * 4 * D * 2
    tokens = (usable - per_chip * 2) // (2 * L * 4 * D * 2)
    assert tokens == 349_323 and tp2["kv_tokens_per_replica"] == tokens and tp2["kv_tokens"] == 4 * tokens
    assert tp2["kv_tokens_per_host"] == 4 * tokens  # the one host holds all 4 replicas
    # tp=1 (8 replicas, 8.03e9 parameters each) caches 113,397 tokens per replica: no row of 131072
    one = (usable - 8_030_261_248 * 2) // (2 * L * 8 * D * 2)
    assert one == 113_397 and _mesh(p, 1)["kv_tokens"] == 8 * one
    # tp=8 (one replica, 1 KV head per chip) caches the most; tp=2's 1,397,292 is over half of it
    eight_chip = L * (2 * C * 512 + 2 * C * 128 + 3 * C * (F // 8) + 2 * C) + 2 * 16032 * C + C
    eight = (usable - 2 * eight_chip) // (2 * L * 1 * D * 2)
    assert eight == 1_764_876 == _mesh(p, 8)["kv_tokens"] and 4 * tokens >= eight / 2
    assert (p["recommended_tp"], p["recommended_dp"]) == (2, 4)
    # with rows of 8192 tokens tp=1 qualifies, and its 907,176 tokens are over half of 1,764,876
    p = _cli_json(capsys, "--model", "llama-3.1-8b", "--devices", "v6e-8", "--context", "8192")
    assert (p["recommended_tp"], p["recommended_dp"]) == (1, 8) and _mesh(p, 1)["rows_at_context"] == 8 * 13


def test_jax_keeps_undivided_weights_and_kv_heads_whole(capsys):
    p = _cli_json(capsys, "--model", "llama-3.1-70b", "--devices", "v5e-16")
    assert (p["chips"], p["hosts"], p["chips_per_host"]) == (16, 4, 4)  # multi-host v5e: VMs of 4 chips
    C, F, L, D = 8192, 28672, 80, 128
    tp16 = _mesh(p, 16)  # q/o -> 512, k/v 1024 -> 64, ffn -> 1792, vocab -> 8016
    assert tp16["weight_bytes"] == 2 * (L * (2 * C * 512 + 2 * C * 64 + 3 * C * 1792 + 2 * C) + 2 * 8016 * C + C)
    assert tp16["kv_bytes_per_token"] == 2 * L * 8 * D * 2  # 16 does not divide 8 KV heads
    p = _cli_json(capsys, "--model", "llama-3.1-70b", "--devices", "v4-24")  # 12 chips: tp=3 possible
    # 3 divides none of 8192, 1024, 28672: only the vocabulary (128256 = 3 x 42752) splits
    tp3 = _mesh(p, 3)
    assert tp3["weight_bytes"] == 2 * (L * (2 * C * 8192 + 2 * C * 1024 + 3 * C * F + 2 * C) + 2 * 42752 * C + C)
    assert tp3["dp"] == 4 and not tp3["fits"]


def test_bad_tpu_slice_is_one_line(capsys):
    for spec, words in [("v4-15", "multiple of 8"), ("v9-8", "unknown TPU generation"),
                        ("v5e-2", "power of two"), ("v6e-512", "power of two"), ("v4", "GENERATION-N")]:
        assert main(["plan", "--model", "llama-3.1-70b", "--devices", spec]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(EntropixError, match="dense Llama-style"):
        tpu_plan(BUILTIN["deepseek-v2"], parse_slice("v4-16"))
    with pytest.raises(EntropixError, match="JAX backend holds weights"):
        tpu_plan(BUILTIN["llama-3.1-8b"], parse_slice("v4-8"), dtype="int8")
    assert parse_slice("V4-8") == TpuSlice("v4-8", "v4", 4, 1, 4, 32 * GIB)
    assert parse_slice("v6e-256") == TpuSlice("v6e-256", "v6e", 256, 64, 4, 32 * GIB)


def test_tpu_text_report(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--devices", "v4-16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("llama-3.1-70b: 70.55B parameters in bf16: weights 131.42 GiB")
    assert "320.0 KiB per token" in lines[0]
    assert lines[1].startswith("v4-16: 8 chips on 2 hosts (4 chips per host), 32.00 GiB HBM per chip")
    row = next(ln for ln in lines if ln.strip().startswith("8 x 1"))
    assert "16.43 GiB" in row and "324,292" in row and row.endswith("<- recommended")
    assert "recommended: tp=8 x dp=1" in lines
    assert all(len(ln) <= 140 for ln in lines)


def test_readme_tpu_plan_lines_run_as_typed_and_say_what_their_comments_say(capsys):
    """The `entropix plan` lines of the README's "Several hosts" block: their outputs hold the
    recommended mesh and the per-chip weights their comments quote."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"^### Several hosts.*?```bash\n(.*?)^```", text, re.M | re.S)
    assert block, "README.md lost its 'Several hosts' block"
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("entropix plan")]
    assert len(lines) == 2
    for line in lines:
        command, _, comment = line.partition("#")
        assert main(shlex.split(command)[1:]) == 0
        out = capsys.readouterr().out
        tp, gib = re.search(r"tp=(\d+)", comment).group(1), re.search(r"([\d.]+ GiB)", comment).group(1)
        assert f"recommended: tp={tp} x dp=1" in out
        assert f"per chip: weights {gib}" in out

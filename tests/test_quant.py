"""Weight-only quantized projections (backends/torch/quant.py) and the compiled decode step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from entropix import EntropixError
from entropix.backends.torch import quant
from entropix.backends.torch.quant import Int4Linear, Int8Linear, int4_groups, quantize_model
from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.sampler.config import SamplerConfig
from entropix.sampler.policy import Entropix, Greedy

from tinymodel import tiny_lm, tiny_model

pytestmark = pytest.mark.skipif(not (quant.available("int8") and quant.available("int4")),
                                reason="this PyTorch lacks the CPU int8/int4 kernels")

DEMO = "How many r's are in the word strawberry?"  # the README's demo prompt


def test_int8_rows_match_their_dequantized_weight():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    lin = Int8Linear.from_float(w)
    ref = x.bfloat16().float() @ lin.dequantized().t()
    assert lin(x).dtype == x.dtype  # the model's one activation dtype, whatever the kernel computes in
    assert torch.allclose(lin(x).float(), ref, atol=0.1, rtol=0.02)
    # half a step of the row's scale, plus the scale's own bf16 rounding (2^-9 of the row's max)
    bound = w.abs().amax(1, keepdim=True) * (1 / 254 + 1 / 512)
    assert ((lin.dequantized() - w).abs() <= bound).all()


def test_int4_groups_follow_the_kernel_layout():
    torch.manual_seed(1)
    w, x = torch.randn(32, 96), torch.randn(2, 96)
    lin = Int4Linear.from_float(w)
    g = int4_groups(w)
    deq = ((g.q.float() - 8).view(32, 3, 32) * g.scale[..., None] + g.zero[..., None]).view(32, 96)
    assert (deq - w).abs().max() <= g.scale.max() / 2 + 1e-5  # round to the nearest of 16 levels
    assert torch.allclose(lin.dequantized(), deq, atol=0.02 * float(w.abs().max()))
    assert torch.allclose(lin(x).float(), x.bfloat16().float() @ deq.t(), atol=0.15, rtol=0.03)


@pytest.mark.parametrize("shape", [(128, 64), (576, 1536)])
def test_wide_products_multiply_the_same_int4_weights_densely(shape):
    """From WIDE_ROWS rows the packed weights are dequantized onto an fp32 GEMM: exactly
    (q - 8) * scale + zero with the stored bf16 scales, fp32 inputs; fewer rows take the kernel
    (bf16 inputs, within its rounding). PyTorch's private packing is read as it really is."""
    from entropix.backends.torch import int4_wide

    torch.manual_seed(3)
    N, K = shape
    g = int4_groups(torch.randn(N, K))
    lin = Int4Linear(g)
    assert int4_wide.block_rows() in (32, 64) and lin.wide
    assert torch.equal(int4_wide.unpack(lin.packed, N, K), g.q)
    s, z = g.scale.bfloat16().float(), g.zero.bfloat16().float()
    w = ((g.q.float() - 8).view(N, K // 32, 32) * s[..., None] + z[..., None]).view(N, K)
    wide, narrow = torch.randn(int4_wide.WIDE_ROWS + 3, K), torch.randn(5, K)
    ref = wide @ w.t()
    assert (lin(wide) - ref).abs().max() <= 1e-5 * ref.abs().max()
    ref = narrow @ w.t()
    err = (lin(narrow) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.02  # the kernel: bf16 activations


def test_wide_products_run_outside_inference_mode_after_inside():
    """The dense path's reused scratch, first made under inference_mode (a decode), is not an
    inference tensor written outside it (a later product without that mode)."""
    from entropix.backends.torch import int4_wide

    lin = Int4Linear(int4_groups(torch.randn(128, 64)))
    x = torch.randn(int4_wide.WIDE_ROWS, 64)
    with torch.inference_mode():
        inside = lin(x)
    torch.testing.assert_close(lin(x), inside)


def test_rows_that_do_not_fill_a_packed_block_stay_on_the_kernel():
    """96 rows fill three 32-row blocks (AVX2) but not 64-row ones (AVX-512): there the wide
    path is off and the kernel multiplies every width, within its bf16 rounding."""
    from entropix.backends.torch import int4_wide

    torch.manual_seed(4)
    g = int4_groups(torch.randn(96, 64))
    lin = Int4Linear(g)
    assert lin.wide == (96 % int4_wide.block_rows() == 0)
    x = torch.randn(int4_wide.WIDE_ROWS + 3, 64)
    ref = x @ lin.dequantized().t()
    assert (lin(x) - ref).abs().max() / ref.abs().max() < 0.02


def test_a_dequantized_q4_1_block_comes_back_to_its_own_levels():
    """Q4_1 stores w = d * q + m with q = 0 and 15 at the block's min and max: requantizing the
    dequantized weights finds the same q (what makes the int4 load exact)."""
    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, size=(16, 64)).astype(np.uint8)
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15
    d = rng.uniform(0.01, 0.1, size=(16, 2)).astype(np.float32)
    m = rng.uniform(-1, 0, size=(16, 2)).astype(np.float32)
    w = (q.reshape(16, 2, 32) * d[..., None] + m[..., None]).reshape(16, 64)
    g = int4_groups(torch.from_numpy(w))
    assert torch.equal(g.q, torch.from_numpy(q))
    assert torch.allclose(g.scale, torch.from_numpy(d), rtol=1e-5)


def test_embedded_q4_1_blocks_read_as_stored(gguf_path):
    from entropix.io.source import open_checkpoint

    ckpt = open_checkpoint(str(gguf_path))
    name = "layers.0.self_attn.k_proj.weight"  # Q4_1, with llama.cpp's row permutation undone
    q, d, m = ckpt.read_int4(name)
    n, k = q.shape
    w = (q.reshape(n, k // 32, 32) * d[..., None] + m[..., None]).reshape(n, k)
    assert np.array_equal(w, ckpt.read(name).array)
    assert ckpt.read_int4("embed_tokens.weight") is None  # Q8_0: not int4 groups
    assert (ckpt.stored_bits(name), ckpt.stored_bits("embed_tokens.weight"), ckpt.stored_bits("norm.weight")) == (4, 8, None)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_every_4bit_block_type_reads_as_the_groups_it_dequantizes_to(qtype):
    """Random bytes are valid blocks of each type; our groups (w = d * q + m per 32 weights) give
    exactly what the gguf package's own dequantization gives."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from entropix.io import gguf as g

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(4)
    N, K = 16, 512
    raw = rng.integers(0, 256, size=N * K // block * size, dtype=np.uint8)
    fields = raw.reshape(-1, size)
    for at in (0,) if qtype == "Q4_0" else (0, 2):  # finite fp16 scales (random bits can be NaN)
        fields[:, at:at + 2] = rng.uniform(-1, 1, len(fields)).astype("<f2").view(np.uint8).reshape(-1, 2)
    q, d, m = g.int4_groups(g.GGUFTensor("w", (K, N), int(t), 0, raw.size), raw)
    assert q.min() >= 0 and q.max() <= 15 and d.shape == m.shape == (N, K // 32)
    ours = (q.reshape(N, K // 32, 32) * d[..., None] + m[..., None]).reshape(N, K)
    assert np.array_equal(ours, dequantize(raw.reshape(N, -1), t).reshape(N, K))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_tiny_model_stays_close_and_keeps_attention_metrics(mode):
    ref, lm = tiny_lm(fuse=True), tiny_lm(fuse=True)
    quantize_model(lm.model, mode)
    assert quant.quant_mode(lm.model) == mode
    ids = torch.tensor([list(b"entropy and varentropy")])
    with torch.inference_mode():
        a, _ = ref.model(ids, ref.model.new_cache(1, 32), last_only=False)
        b, _ = lm.model(ids, lm.model.new_cache(1, 32), last_only=False)
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    if mode == "int8":
        assert (a - b).abs().max() < 0.1 * a.abs().max()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    else:  # 16 levels per group of random normal weights: close, not equal (Q4_1 files load exactly)
        assert corr > 0.9
    policy = Entropix(SamplerConfig(), -1)  # reads the captured attention of the newest query
    recs = list(generate(lm.engine(), [Request(prompt=list(b"abc"), policy=policy, max_tokens=6, seed=3)]))
    assert recs and all(r.attn is not None and all(math.isfinite(v) for v in r.attn.values()) for r in recs)


def test_modes_and_devices_are_checked(gguf_path):
    from entropix.io.source import open_checkpoint

    blocks = open_checkpoint(str(gguf_path))
    assert quant.resolve("auto", torch.device("cpu"), blocks) == "auto"  # per tensor, as stored
    assert quant.resolve("auto", torch.device("meta"), blocks) == "none"  # CUDA, MPS: dense
    assert quant.resolve("auto", torch.device("cpu")) == "none"
    with pytest.raises(EntropixError, match="unknown --quant 'int3'"):
        quant.check_mode("int3")
    with pytest.raises(EntropixError, match="runs on the CPU"):
        quant.check_device("int8", torch.device("cuda"))


@pytest.mark.parametrize("args, needle", [
    (["generate", "hi", "--quant", "int3", "-n", "1"], "unknown --quant 'int3'"),
    (["generate", "hi", "--quant", "int8", "--tp", "2", "-n", "1"], "tensor parallelism"),
    (["bench", "--modes", "int4,fp8"], "unknown mode 'fp8'"),
    (["generate", "hi", "--quant", "int4", "--backend", "jax", "-n", "1"], "takes --backend torch"),
])
def test_bad_quant_input_is_one_line(args, needle, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("entropix: error:")]
    assert rc != 0 and len(lines) == 1 and needle in lines[0], err


NEAR_TIE = 0.05  # nats between fp32's top two: int4/int8 rounding (and the CPU's kernel) may flip such a step


@pytest.mark.slow  # the embedded model, 48 tokens in two weight modes
@pytest.mark.parametrize("prompt", [DEMO, "How many r's are in strawberry?"])
def test_auto_follows_fp32_greedy_except_at_near_ties(smol, prompt):
    """The README's claim: the default (auto: the file's Q4_1 blocks on the int4 kernel, its Q8_0
    embedding as int8 rows), fed fp32's greedy text, picks fp32's token at every step where fp32's
    top two are more than NEAR_TIE apart; decoding freely, it leaves fp32's text only at a near-tie."""
    from entropix.loading import load_model

    auto = load_model(None, progress=False)
    assert auto.quant == "int4" and quant.weight_kinds(auto.model) == {"int4": 120, "int8": 1, "dense": 0}
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def run(m):
        req = Request(prompt=ids, policy=Greedy(), max_tokens=48, stop_ids=m.tokenizer.stop_ids)
        return list(generate(m.engine(()), [req]))

    ref = run(smol)
    full = ids + [r.token for r in ref]
    with torch.inference_mode():
        logits, _ = auto.model(torch.tensor([full]), auto.model.new_cache(1, len(full)), last_only=False)
    picked = logits[0, len(ids) - 1:len(full) - 1].argmax(-1).tolist()
    clear = [k for k, r in enumerate(ref) if r.margin > NEAR_TIE]
    assert len(clear) >= 0.8 * len(ref) and all(picked[k] == ref[k].token for k in clear)
    own = [r.token for r in run(auto)]
    split = next((k for k, (a, b) in enumerate(zip(own, full[len(ids):])) if a != b), None)
    assert split is None or ref[split].margin <= NEAR_TIE, (split, ref[split].margin)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    from entropix.backends.torch import compiled

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    ref, model = tiny_model(fuse=True), tiny_model(fuse=True)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/usr/bin/" + name)
    assert compiled.compile_decode(model)
    toks = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        ca, cb = ref.new_cache(1, 16), model.new_cache(1, 16)
        ref(toks, ca), model(toks, cb)
        for t in (9, 10):
            a, _ = ref(torch.tensor([[t]]), ca)
            b, _ = model(torch.tensor([[t]]), cb)
            assert torch.equal(a, b)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "torch.compile failed" in ln]
    assert len(warnings) == 1 and "no compiler here" in warnings[0]


def test_no_cxx_compiler_means_eager(monkeypatch, capsys):
    from entropix.backends.torch import compiled

    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert not compiled.compile_decode(tiny_model(fuse=True))
    assert "needs a C++ compiler" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(mode="int4"):
    """The compiled decode step (inductor) against eager on the tiny model, two rows, with capture."""
    from entropix.backends.torch.compiled import compile_decode

    eager, comp = tiny_lm(fuse=True), tiny_lm(fuse=True)
    for m in (eager, comp):
        quantize_model(m.model, mode)
    assert compile_decode(comp.model)
    def tokens(m):
        reqs = [Request(prompt=list(p), policy=Greedy(), max_tokens=12, seed=0, stop_ids=frozenset())
                for p in (b"the cat", b"a much longer prompt")]
        order = {r.id: i for i, r in enumerate(reqs)}
        return [(order[r.request_id], r.token) for r in generate(m.engine(), reqs)]

    assert tokens(eager) == tokens(comp)
    assert not comp.model.compiled_step.failed


def test_server_decodes_with_quantized_weights():
    """The server (continuous batching, CoT rows, entropix with attention) over int4 weights."""
    import httpx

    from entropix.serve import ServerThread, create_app

    lm = tiny_lm(fuse=True, max_position_embeddings=1024)
    quantize_model(lm.model, "int4")
    msgs = [{"role": "user", "content": "2 + 3?"}]
    with ServerThread(create_app(lm, max_rows=8, max_n=4)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for sampler in ("entropix", "cot"):
            r = http.post("/v1/chat/completions", json={"model": lm.name, "messages": msgs, "max_tokens": 5,
                                                        "sampler": sampler, "seed": 1, **({"branches": 3} if sampler == "cot" else {})})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gguf_path):
    from tiny import write_hf_model

    return write_hf_model(tmp_path_factory.mktemp("q") / "tiny", gguf_path)


@pytest.mark.slow  # a bench: loads the checkpoint in transformers too
def test_modes_bench_reports_every_mode_against_fp32_and_transformers(tiny_hf):
    """The shape of `entropix bench --modes` (figures are not asserted: speed belongs to benchmarks)."""
    from entropix.bench.modes import run_modes_bench
    from entropix.loading import load_model

    lm = load_model(str(tiny_hf), device="cpu", progress=False)
    out = run_modes_bench(lm, ["none", "int8", "int4"], tokens=6, prompt_tokens=8, repeats=1, rss=False)
    assert out["transformers"]["tps"] > 0 and out["best"] in out["modes"]
    for mode, row in out["modes"].items():
        assert row["tps"] > 0 and row["vs_transformers"] > 0 and 0 <= row["argmax_agree"] <= 1
        assert 0 <= row["greedy_same_prefix"] <= 6
    assert out["modes"]["none"]["logits_max_err"] == 0 and out["modes"]["int8"]["logits_max_err"] > 0
    assert out["modes"]["int4"]["weights_mb"] <= out["modes"]["int8"]["weights_mb"] < out["modes"]["none"]["weights_mb"]


@pytest.mark.slow  # a process per contender
def test_modes_bench_measures_each_contenders_peak_rss(tiny_hf, monkeypatch):
    """`bench --modes/--peer` without --no-rss: each contender loads and decodes in a process of its
    own, whose peak RSS is reported (tests/test_readme_commands.py runs `--peer` with --no-rss)."""
    from entropix.bench import modes
    from entropix.loading import load_model

    monkeypatch.setattr(modes, "load_transformers", lambda lm: None)  # one contender: one process
    lm = load_model(str(tiny_hf), device="cpu", progress=False)
    out = modes.run_modes_bench(lm, ["none"], tokens=4, prompt_tokens=8, repeats=1, rss=True)
    assert "transformers" not in out and out["modes"]["none"]["peak_rss_mb"] > 0


@pytest.mark.slow  # transformers loads the checkpoint too
def test_bench_times_transformers_as_its_baseline(tiny_hf, capsys):
    """`entropix bench --json` against transformers (tests/test_readme_commands.py runs the README's
    bench lines with --no-transformers where transformers would read the 49k-token GGUF again)."""
    assert main(["bench", "--model", str(tiny_hf), "--device", "cpu", "--tokens", "4", "--prompt-tokens", "8",
                 "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ours_tps"] > 0 and out["transformers_tps"] > 0
    assert out["ratio"] == pytest.approx(out["ours_tps"] / out["transformers_tps"], rel=0.01)


def test_llama_cpp_peer_needs_a_gguf(tiny_hf, capsys):
    rc = main(["bench", "--model", str(tiny_hf), "--peer", "llama.cpp", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "entropix: error:" in err and ("GGUF" in err or "llama-cpp-python" in err), err


def test_the_cli_default_is_auto(monkeypatch):
    from entropix.cli import build_parser

    monkeypatch.setenv("ENTROPIX_QUANT", "int8")  # no environment variable changes the default
    for args in (["generate", "hi"], ["serve"], ["eval", "--task", "arithmetic"], ["calibrate"], ["bench"], ["chat"]):
        assert build_parser().parse_args(args).quant == "auto"


def test_shapes_the_int8_kernel_cannot_take_stay_dense():
    """The int8 kernel crashes the process, or returns NaN, on an input width that is not a
    multiple of its vector (8 on AVX2, 16 on AVX-512: a 20-wide DeepSeek expert, a 24-wide
    Qwen2 projection): such a layer stays dense, and building one directly refuses."""
    for width in (20, 24, 40):
        lin = torch.nn.Linear(width, 48, bias=False)
        assert quant.quantize_linear(lin, "int8") is lin and quant.quantize_linear(lin, "int4") is lin
        with pytest.raises(EntropixError, match="in_features % 16"):
            Int8Linear.from_float(torch.randn(48, width))
        assert quant.kind_of(None, "w", (48, width), "int4") == "dense"
    assert quant.kind_of(None, "w", (48, 48), "int4") == "int8"  # 48 rows fit int8, not int4's K % 32

"""Tensor parallelism on the CPU with gloo: shards, parity with one device, the CLI and the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from entropix.backends.base import SampleGroup
from entropix.backends.torch.loader import load
from entropix.backends.torch.tp import load_shard, rank_slices
from entropix.decode.engine import generate
from entropix.decode.records import Request
from entropix.io.checkpoint import open_path
from entropix.sampler.config import SamplerConfig, SamplingParams
from entropix.sampler.policy import Entropix, Greedy, Sample
from tiny import write_family_model, write_gemma_model, write_gguf_from_hf, write_hf_model

pytestmark = pytest.mark.slow  # tensor parallelism spawns gloo ranks (make test-fast leaves it out)

REPO = Path(__file__).resolve().parents[1]
ENTROPIX = [sys.executable, "-m", "entropix.cli"]
PROMPTS = [[5, 17, 300, 41, 9, 1200, 77], [8, 6, 2500, 13]]


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory, gguf_path):
    """A random Llama with 8 query and 2 KV heads and 160 feed-forward units (uneven over 3)."""
    return write_hf_model(tmp_path_factory.mktemp("tp") / "gqa", gguf_path, seed=5, hidden_size=64,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=160)


# -- what each rank holds -----------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_hold_only_their_slice_and_tile_the_model(gqa_folder, world):
    ckpt = open_path(gqa_folder)
    full = load(ckpt, device="cpu", dtype="float32", fuse=False)
    parts = [load_shard(ckpt, r, world, "cpu", "float32") for r in range(world)]
    cfg, D = ckpt.config, ckpt.config.head_dim
    for r, m in enumerate(parts):
        s = rank_slices(cfg, r, world)
        a = m.layers[1].self_attn
        assert a.q_proj.weight.shape == (s.n_heads * D, 64) and a.o_proj.weight.shape == (64, s.n_heads * D)
        assert a.k_proj.weight.shape == (len(s.kv_heads) * D, 64)
        assert m.layers[1].mlp.down_proj.weight.shape == (64, s.ffn[1] - s.ffn[0])
        assert m.embed_tokens.weight.shape == (s.vocab[1] - s.vocab[0], 64)
        for h_local, h in enumerate(s.kv_heads):  # each local KV head is that global head's rows
            torch.testing.assert_close(a.k_proj.weight[h_local * D:(h_local + 1) * D],
                                       full.layers[1].self_attn.k_proj.weight[h * D:(h + 1) * D], rtol=0, atol=0)
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"):  # column-wise: output rows
        got = torch.cat([m.get_submodule(f"layers.0.{name}").weight for m in parts])
        assert torch.equal(got, full.get_submodule(f"layers.0.{name}").weight)
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # row-wise: input columns
        got = torch.cat([m.get_submodule(f"layers.0.{name}").weight for m in parts], 1)
        assert torch.equal(got, full.get_submodule(f"layers.0.{name}").weight)
    assert torch.equal(torch.cat([m.lm_head.weight for m in parts]), full.lm_head.weight)
    held = sum(p.numel() for m in parts for p in m.parameters())
    norms = sum(p.numel() for n, p in full.named_parameters() if "norm" in n)
    kv_copies = sum(len(rank_slices(cfg, r, world).kv_heads) for r in range(world)) - 2
    assert held == sum(p.numel() for p in full.parameters()) + (world - 1) * norms + kv_copies * 2 * D * 64 * 2


def test_gguf_is_read_and_split_the_same_way(gqa_folder, gguf_path, tmp_path):
    f32 = open_path(write_gguf_from_hf(gqa_folder, tmp_path / "gqa.gguf", gguf_path))
    q8 = open_path(write_gguf_from_hf(gqa_folder, tmp_path / "gqa-q8.gguf", gguf_path, qtype="Q8_0"))
    hf = open_path(gqa_folder)
    for r in range(3):
        a, b = load_shard(hf, r, 3, "cpu", "float32"), load_shard(f32, r, 3, "cpu", "float32")
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight", "embed_tokens.weight"):
        whole = q8.read(name).array
        rows = whole.shape[0] // 2 if "embed" in name else 8  # q/k: one whole head (8 rows)
        assert np.array_equal(q8.read_slice(name, 0, rows, 2 * rows).array, whole[rows:2 * rows])


def test_column_slices_are_read_in_blocks(gqa_folder):
    ckpt = open_path(gqa_folder)
    name = "layers.0.mlp.down_proj.weight"
    assert np.array_equal(ckpt.read_slice(name, 1, 37, 113).array, ckpt.read(name).array[:, 37:113])


# -- parity with one device, in this process as rank 0 ---------------------------------------------

def _steps(backend, groups_of, prompts, steps: int = 6):
    """Prefill two prompts (the second as two rows), then a fork and `steps` decode steps:
    every step's logits and sampled matrix."""
    out = []
    backend.prefill(prompts, [1, 2], capture=True)
    for i in range(steps):
        local = getattr(backend, "local", backend)
        host = backend.sample(groups_of(i, backend.rows), 4)
        out.append((local.logits.clone(), local.attn.clone(), host))
        if i == 2:
            backend.select([0, 1, 2, 0])  # a fork and a reorder
            host = backend.sample(groups_of(i, 4), 4)
        backend.advance([int(t) for t in host.token], capture=True)
    return out


def _groups(i: int, rows: int) -> list[SampleGroup]:
    """An entropix group and a sampling group over the rows, with draws injected here."""
    rng = np.random.default_rng(100 + i)
    # thresholds around the random model's H (15.3 bits) and V (0.84-0.88): pause, treading, adaptive and resample
    cfg = SamplerConfig(low_ent=1.0, med_ent=15.0, high_ent=15.0, low_vent=0.1, med_vent=0.85, high_vent=0.855)
    ent, smp = Entropix(cfg, 7), Sample(SamplingParams(temperature=0.8, top_k=50))
    a, b = tuple(range(0, rows, 2)), tuple(range(1, rows, 2))
    flags = np.array([[False, j % 2 == 0] for j in range(len(a))])  # a pause may be inserted in every other row
    return [SampleGroup(ent, a, uniforms=rng.random((len(a), ent.draws)), flags=flags),
            SampleGroup(smp, b, uniforms=rng.random((len(b), smp.draws)))]


def _check_parity(one, lm, prompts, tokens: int = 12) -> set:
    """`lm` over its ranks (rank 0 here): logits, attention statistics, sampled tokens and entropix
    states per step as on one device `one`, then the same greedy text; the entropix rows' states."""
    ref, got = (_steps(x.engine().backend, _groups, prompts) for x in (one, lm))
    states = set()
    for (l1, a1, h1), (l2, a2, h2) in zip(ref, got):
        assert (l1 - l2).abs().max() < 1e-4
        assert (a1 - a2).abs().max() < 1e-5  # attention statistics, gathered over ranks
        assert np.array_equal(h1.token, h2.token) and np.array_equal(h1.code, h2.code)
        np.testing.assert_allclose(h1.entropy, h2.entropy, atol=1e-4)
        states |= set(h1.code[::2].tolist())
    reqs = [Request(prompt=p, policy=Greedy(), max_tokens=tokens, stop_ids=frozenset()) for p in prompts]
    toks = [[r.token for r in generate(x.engine(), reqs)] for x in (one, lm)]
    assert toks[0] == toks[1] and len(toks[0]) == tokens * len(prompts)
    return states


def _check_dropped(lm) -> None:
    """A backend dropped on rank 0 is dropped on every rank: its id goes out with the next step."""
    import gc

    gc.collect()  # the backends of earlier checks over these ranks are gone before this one starts
    a, b = lm.engine().backend, lm.engine().backend
    a.prefill(PROMPTS, [1, 1], capture=False)
    gone = a.id
    del a
    gc.collect()
    assert lm.session.ids.pending == [gone]
    b.prefill(PROMPTS[:1], [1], capture=False)  # the step that tells the other ranks
    assert lm.session.ids.pending == [] and b.rows == 1


# -- the command line, and parity over the ranks it started ------------------------------------------
#
# Each set of ranks costs a process per rank (torch's import, the model's load), so one set serves
# all the checks of its world: `entropix generate --tp N` runs here as rank 0, and the ranks it
# started then answer the step-by-step parity checks. The CLI as a process of its own, exiting when
# done: test_torchrun_ranks_follow_rank_0 and the server test.

GENERATE = ["generate", "What is 7 times 6?", "--json", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def cli(cli_load_once, capsys, monkeypatch):
    """`entropix generate ... --tp N` run here (rank 0 for N > 1: the CLI spawns the other ranks,
    which stay up for more checks until the test ends): its tokens and the model it used."""
    import entropix.cli.generate as command
    from entropix.cli import main

    used, load = [], command.load

    def keep(args, quiet=False):
        lm = load(args, quiet)
        if lm.session is not None:
            lm.session.exit_on_lost = False  # a rank lost fails the test instead of ending this process
        used.append(lm)
        return lm

    def run(model: str, tp: int, extra=()):
        rc = main(GENERATE + ["--model", model, "--tp", str(tp), *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return json.loads(out)["tokens"], used[-1]

    monkeypatch.setattr(command, "load", keep)
    yield run
    for lm in used:
        lm.close()  # the ranks, if any


@pytest.fixture
def one_device(cli):
    """`entropix generate ... --tp 1` run here (the model loaded once per test process): its tokens."""
    return lambda model, extra=(): cli(model, 1, extra)[0]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tp_matches_one_device(gqa_folder, cli, world):
    """`entropix generate --tp N` prints one device's tokens; then, over the same ranks, every step
    matches one device, and a backend dropped on rank 0 is dropped on every rank."""
    ref, one = cli(str(gqa_folder), 1, ["--max-tokens", "16"])
    tokens, lm = cli(str(gqa_folder), world, ["--max-tokens", "16"])
    assert len(ref) == 16 and tokens == ref
    assert lm.session.world == world and one.session is None
    assert (one.quant, one.dtype, lm.dtype) == ("none", "float32", "float32")  # the one device: dense fp32
    states = _check_parity(one, lm, PROMPTS)
    assert len(states) >= 3, states  # the entropix rows went through several states
    _check_dropped(lm)


def test_tp_matches_one_device_embedded(smol, cli):
    """The embedded model over two ranks, a smoke test of a few tokens (worlds 2, 3 and 4:
    test_tp_matches_one_device on a tiny checkpoint)."""
    ref, _ = cli("default", 1, ["--max-tokens", "8"])
    tokens, lm = cli("default", 2, ["--max-tokens", "8"])
    assert tokens == ref and len(ref) == 8 and lm.session.world == 2
    _check_parity(smol, lm, [smol.tokenizer.encode(q) for q in ("What is 7 times 6?", "Name a colour.")], tokens=4)


def test_tp_errors_are_one_line(gqa_folder, capsys):
    """Both fail before any rank starts (in this process: tests/test_cli.py runs the script's own exit)."""
    from entropix.cli import main

    assert main(["generate", "hi", "--model", str(gqa_folder), "--tp", "9"]) == 2
    assert "more than the model's 8 attention heads" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["generate", "hi", "--model", str(gqa_folder), "--tp", "0"]) == 2
    assert "--tp must be at least 1" in capsys.readouterr().err


# -- memory per rank ---------------------------------------------------------------------------

PEAK = """
import sys
from entropix.io.checkpoint import open_path
from entropix.backends.torch import loader, tp
def status(key):  # VmHWM: this process's peak RSS (getrusage's maxrss would include the parent's, from before exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
ckpt = open_path(sys.argv[1]); rank, world = int(sys.argv[2]), int(sys.argv[3])
before = status("VmRSS")
m = loader.load(ckpt, device="cpu") if world == 1 else tp.load_shard(ckpt, rank, world, "cpu")
print(status("VmHWM") - before, sum(p.numel() * p.element_size() for p in m.parameters()))
"""


def _write_big(folder: Path, src: Path) -> Path:
    """A bf16 Llama of about 300 MB (6 layers, hidden 1024, ffn 4096, vocab 49152); constant weights
    (only memory is measured), with a byte-level tokenizer: a folder opens only with one, and each
    measuring process opens it in ~1 ms where the tiny model's 49k tokens take ~0.5 s."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    C, Fd, L, V = 1024, 4096, 6, cfg["vocab_size"]
    cfg.update(hidden_size=C, intermediate_size=Fd, num_hidden_layers=L, num_attention_heads=16,
               num_key_value_heads=4, head_dim=64, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))

    def full(*shape):
        return torch.full(shape, 2.0 ** -7, dtype=torch.bfloat16)

    w = {"model.embed_tokens.weight": full(V, C), "lm_head.weight": full(V, C), "model.norm.weight": full(C)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (C, C)), ("self_attn.k_proj", (256, C)), ("self_attn.v_proj", (256, C)),
                         ("self_attn.o_proj", (C, C)), ("mlp.gate_proj", (Fd, C)), ("mlp.up_proj", (Fd, C)),
                         ("mlp.down_proj", (C, Fd)), ("input_layernorm", (C,)), ("post_attention_layernorm", (C,))]:
            w[p + n + ".weight"] = full(*shape)
    save_file(w, str(folder / "model.safetensors"))
    return folder


def test_peak_memory_per_rank_is_its_share(gqa_folder, tmp_path):
    big = _write_big(tmp_path / "big", gqa_folder)
    assert 250e6 < (big / "model.safetensors").stat().st_size < 400e6

    def peak(rank: int, world: int) -> tuple[int, int]:
        r = subprocess.run([sys.executable, "-c", PEAK, str(big), str(rank), str(world)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        kib, held = r.stdout.split()
        return int(kib) * 1024, int(held)  # peak RSS over the RSS before loading, bytes held

    single, whole = peak(0, 1)
    assert single >= whole * 0.95  # the reference peak holds the model
    for rank in (0, 1):
        p, held = peak(rank, 2)
        assert held <= whole * 0.51  # its slice (norms are whole on every rank)
        assert p <= 0.6 * single, (rank, p, single)


# -- the server --------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_tp2_answers_and_stops_with_503_when_a_rank_dies(gqa_folder):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(ENTROPIX + ["serve", "--model", str(gqa_folder), "--tp", "2", "--port", str(port),
                                          "--device", "cpu", "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.2)
        name = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
        chat = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
        status, body = _post(base + "/v1/chat/completions", chat)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 8
        status, body = _post(base + "/v1/completions", {"model": name, "prompt": "Once", "max_tokens": 5})
        assert status == 200 and json.loads(body)["choices"][0]["text"]
        status, body = _post(base + "/v1/chat/completions", dict(chat, stream=True))
        events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "data: [DONE]" and len(events) >= 9
        (worker,) = _children(server.pid)
        os.kill(worker, signal.SIGKILL)
        status, body = _post(base + "/v1/chat/completions", chat, timeout=60)
        err = json.loads(body)["error"]
        assert status == 503 and "rank 1" in err["message"] and err["code"] == "backend_unavailable"
        assert server.wait(60) != 0  # it stops by itself, not hanging
        assert "rank 1" in server.stderr.read().decode()
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3"])
def test_tp_runs_gemma_and_qwen3(family, tmp_path, cli):
    """Gemma over two ranks (3 or 5 query heads split unevenly, one KV head on both): its extra norms
    and per-head q/k norms (Gemma 3, Qwen3) whole on each rank, its score scale and soft cap in the
    gathered attention statistics; prompts longer than the sliding window (8)."""
    write = write_family_model if family == "qwen3" else write_gemma_model
    folder = write(tmp_path / family, family)
    ref, one = cli(str(folder), 1, ["--max-tokens", "16"])
    tokens, lm = cli(str(folder), 2, ["--max-tokens", "16"])
    assert len(ref) == 16 and tokens == ref and lm.session.world == 2
    texts = ("Tom has 3 apples and buys 4 more. How many apples does he have?", "The quick brown fox jumps over the lazy dog")
    prompts = [one.tokenizer.encode(t) for t in texts]
    assert min(map(len, prompts)) > max(one.config.sliding_window, 8)
    _check_parity(one, lm, prompts)


def test_torchrun_ranks_follow_rank_0(gqa_folder, one_device):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "entropix.cli", "generate", "What is 7 times 6?", "--model", str(gqa_folder), "--json",
           "--device", "cpu", "--dtype", "float32", "--max-tokens", "16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == one_device(str(gqa_folder), ["--max-tokens", "16"])


def test_a_process_that_led_ranks_leaves_with_its_status_and_all_its_output(gqa_folder):
    """ranks.leave skips the interpreter's teardown (gloo's threads can abort it): the status given
    still comes out, and what was written to a block-buffered pipe is flushed first."""
    code = ("import sys\n"
            "from entropix.loading import load_tensor_parallel\n"
            "from entropix.backends.torch import ranks\n"
            f"lm = load_tensor_parallel({str(gqa_folder)!r}, 2, device='cpu', dtype='float32')\n"
            "assert ranks.started()\n"
            "print('\\n'.join(str(i) for i in range(5000)))\n"
            "ranks.leave(5)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 5, r.stderr
    assert r.stdout.split() == [str(i) for i in range(5000)]


@pytest.mark.parametrize("field, value, what", [("qkv_bias", True, "biases"), ("kv_lora_rank", 8, "latent attention"),
                                                 ("n_routed_experts", 4, "experts")])
def test_tp_refuses_what_it_would_split_wrongly(field, value, what):
    from dataclasses import replace

    from entropix import EntropixError
    from entropix.backends.torch.tp import _check_supported
    from entropix.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    _check_supported(cfg)  # Llama-style: fine
    with pytest.raises(EntropixError, match=what):
        _check_supported(replace(cfg, **{field: value}))

"""Mistral, Qwen2, Qwen3 and DeepSeek-V2 (MLA + MoE + YaRN) against transformers, on tiny random
checkpoints that transformers writes here: logits over a ragged batch, greedy text through the
CLI, the MLA cache, attention statistics, and the samplers, CoT and the server end to end."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from entropix import EntropixError
from entropix.cli import main
from entropix.loading import load_model

from family_parity import serve_entropix_and_cot, cli_json, fp32_models, tiny_folders, hf_logits, hf_model, ragged
from tiny import write_family_gguf, write_family_model

FAMILIES = ["mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v2_full", "qwen2_window"]
MAIN = FAMILIES[:4]
PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have? The quick brown fox"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("families"), FAMILIES, write_family_model)


@pytest.fixture(scope="module")
def models(folders):
    return fp32_models(folders)


def prefill(model, ids, mask):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    cache.starts = [int((m == 0).sum()) for m in mask]
    with torch.inference_mode():
        logits, _ = model(ids, cache, last_only=False)
    return logits, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_over_a_ragged_batch(family, folders, models):
    """Prefill (left-padded, lengths 23/14/6) and three decode steps, within 1e-4 of transformers."""
    lm, hf = models[family], hf_model(folders[family])
    lens = [23, 14, 6]
    ids, mask = ragged(lm.config.vocab_size, lens)
    nxt = torch.randint(10, lm.config.vocab_size, (3, 3), generator=torch.Generator().manual_seed(1))
    full_ids, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    ref = hf_logits(hf, full_ids, full_mask)
    ours, cache = prefill(lm.model, ids, mask)
    with torch.inference_mode():
        steps = [lm.model(nxt[:, j:j + 1], cache, last_only=False)[0] for j in range(3)]
    ours = torch.cat([ours] + steps, 1)
    P = ids.shape[1]
    err = max((ours[b, P - n:] - ref[b, P - n:]).abs().max().item() for b, n in enumerate(lens))
    assert err < 1e-4, f"{family}: max |ours - transformers| = {err:.2e}"


@pytest.mark.slow  # each family end to end (the CLI and the server on the tiny Llama: test_cli*.py, test_server.py)
@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_identical_through_the_cli(family, folders, models, capsys):
    folder = folders[family]
    res = cli_json(["generate", PROMPT, "--model", str(folder), "--raw", "--json", "--max-tokens", "32",
                    "--device", "cpu", "--dtype", "float32"], capsys)
    ids = models[family].tokenizer.encode(PROMPT)
    assert res["usage"]["prompt_tokens"] == len(ids)
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = hf_model(folder).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32,
                                        do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert res["tokens"] == ref and len(ref) == 32


def test_mla_cache_holds_the_compressed_form_and_decode_matches_full_attention(models):
    """kv_lora_rank + qk_rope_head_dim numbers per token and layer; token-by-token decode (latent
    attention) equals one full forward (expanded keys and values) over a ragged batch."""
    from entropix.backends.torch.mla import ABSORB_MAX_T, LatentCache

    model = models["deepseek_v2"].model
    c = model.config
    lens = [30, 19]
    ids, mask = ragged(c.vocab_size, lens, seed=3)
    assert ids.shape[1] > ABSORB_MAX_T  # the full forward takes the expanded path
    full, cache = prefill(model, ids, mask)
    assert isinstance(cache, LatentCache)
    per_token = (cache.k.numel() + cache.v.numel()) / (c.num_hidden_layers * cache.batch * cache.capacity)
    assert per_token == c.kv_lora_rank + c.qk_rope_head_dim == 28
    P = ids.shape[1]
    step_cache = model.new_cache(2, 4)  # small: it must grow
    step_cache.starts = [P - n for n in lens]
    with torch.inference_mode():
        first, _ = model(ids[:, :P - 12], step_cache, last_only=False)
        steps = [model(ids[:, j:j + 1], step_cache, last_only=False)[0] for j in range(P - 12, P)]
    stepped = torch.cat([first] + steps, 1)
    err = max((stepped[b, P - n:] - full[b, P - n:]).abs().max().item() for b, n in enumerate(lens))
    assert err < 1e-4
    assert step_cache.lengths == [P, P]


def test_moe_dispatch_equals_a_per_token_reference(models):
    """The batched dispatch equals running each token through its top-k experts one by one."""
    moe = models["deepseek_v2_full"].model.layers[1].mlp
    x = torch.randn(37, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = moe(x[None])[0]
        weights, ids = moe.gate(x)
        want = []
        for n in range(x.shape[0]):
            y = moe.shared_experts(x[n])
            for w, e in zip(weights[n], ids[n]):
                gate, up = (moe.experts.gate_up_proj[e] @ x[n]).chunk(2)
                y = y + w * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
            want.append(y)
    assert len(set(ids.flatten().tolist())) > 2  # several experts were used
    assert (got - torch.stack(want)).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["deepseek_v2", "mistral"])
def test_attention_statistics_match_transformers_attentions(family, folders, models):
    """The newest query's attention entropy per head, from MLA's latent scores or over Mistral's
    window, equals the one computed from transformers' attention matrix."""
    lm = models[family]
    ids, mask = ragged(lm.config.vocab_size, [20], seed=7)
    with torch.inference_mode():
        p = hf_model(folders[family], eager=True)(ids, output_attentions=True).attentions[-1][:, :, -1].double()
        _, stats = lm.model(ids, lm.model.new_cache(1, 20), capture_layers=(-1,))
    s = stats[lm.config.num_hidden_layers - 1]
    ent = -(p * torch.log2(p.clamp_min(1e-300))).sum(-1)
    assert torch.allclose(s.entropy.double(), ent, atol=1e-4)
    assert torch.allclose(s.deviation.double(), (p - p.mean(1, keepdim=True)).abs().sum(-1), atol=1e-4)
    if family == "mistral":  # only the window's keys count
        assert s.entropy.max().item() <= math.log2(lm.config.sliding_window) + 1e-4


@pytest.mark.slow  # each family end to end (the CLI and the server on the tiny Llama: test_cli*.py, test_server.py)
@pytest.mark.parametrize("family", MAIN)
def test_entropix_sampler_and_cot_through_the_cli(family, folders, capsys):
    base = ["generate", PROMPT, "--model", str(folders[family]), "--json", "--max-tokens", "6", "--device", "cpu"]
    ent = cli_json(base + ["--sampler", "entropix", "--seed", "3"], capsys)
    assert 1 <= len(ent["tokens"]) <= 6 and len(ent["records"]) == len(ent["tokens"])
    from entropix.sampler.policy import ENTROPIX_STATES

    assert all(r["state"] in ENTROPIX_STATES for r in ent["records"])
    assert all(r["attn_entropy"] > 0 for r in ent["records"])  # the attention statistics reached the sampler
    cot = cli_json(base + ["--sampler", "cot", "--branches", "3"], capsys)
    assert "branches" in cot and len(cot["branches"]) == 3


@pytest.mark.slow  # each family end to end (the CLI and the server on the tiny Llama: test_cli*.py, test_server.py)
@pytest.mark.parametrize("family", MAIN)
def test_server_end_to_end(family, models):
    serve_entropix_and_cot(models[family])


def test_chat_templates_of_the_families(models):
    qwen = models["qwen2"].tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert qwen == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ds = models["deepseek_v2"].tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert ds == "<｜begin▁of▁sentence｜>User: Hi\n\nAssistant:"
    assert models["qwen2"].tokenizer.encode_chat([{"role": "user", "content": "Hi"}])[0] \
        == models["qwen2"].tokenizer.find_token("<|im_start|>")


@pytest.mark.parametrize("family, want", [
    ("deepseek_v2", "<｜begin▁of▁sentence｜>User: Hi\n\nAssistant:"),
    ("qwen3", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
])
def test_files_without_a_template_get_their_familys(family, want, folders, tmp_path):
    from entropix.io.source import open_checkpoint

    folder = tmp_path / family
    shutil.copytree(folders[family], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = open_checkpoint(str(folder)).tokenizer
    assert tok.chat_template is None
    assert tok.render_chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]) == want
    if family.startswith("deepseek"):
        assert tok.find_token("<｜end▁of▁sentence｜>") in tok.stop_ids


def test_unsupported_architecture_lists_the_supported(tmp_path, folders):
    folder = tmp_path / "m"
    shutil.copytree(folders["qwen2"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EntropixError, match=r"unsupported architecture 'mamba' \(supported: .*qwen2.*deepseek_v2"):
        load_model(str(folder), progress=False)


@pytest.mark.parametrize("family, split", [("qwen2", False), ("qwen3", False), ("deepseek_v2", False),
                                           ("deepseek_v2", True)])
def test_gguf_files_of_the_families_load_as_their_folders(family, split, folders, models, tmp_path):
    """qwen2 / qwen3 / deepseek2 GGUF files (tensors named as the gguf package names them;
    experts as 3D tensors; kv_b split into k_b and v_b) give the folder's logits and tokens."""
    path = write_family_gguf(folders[family], tmp_path / f"{family}.gguf", split_kv_b=split)
    lm, ref = load_model(str(path), device="cpu", dtype="float32", progress=False), models[family]
    assert lm.config.arch == {"qwen2": "qwen2", "qwen3": "qwen3"}.get(family, "deepseek2")
    assert lm.tokenizer.encode(PROMPT) == ref.tokenizer.encode(PROMPT)
    lens = [17, 9]
    ids, mask = ragged(ref.config.vocab_size, lens, seed=11)
    got, want = prefill(lm.model, ids, mask)[0], prefill(ref.model, ids, mask)[0]
    P = ids.shape[1]
    assert max((got[b, P - n:] - want[b, P - n:]).abs().max().item() for b, n in enumerate(lens)) < 1e-5


def test_unsupported_gguf_architecture_lists_the_supported(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EntropixError, match=r"unsupported GGUF architecture 'mamba' \(supported: .*qwen3.*deepseek2"):
        load_model(str(path), progress=False)


@pytest.mark.slow  # each family end to end (the CLI and the server on the tiny Llama: test_cli*.py, test_server.py)
def test_bench_compares_with_transformers_on_a_moe_folder(models):
    """`entropix bench` loads the same MoE folder in transformers and reports a ratio from one run
    (a figure, not asserted: speed is measured in benchmarks, not in unit tests)."""
    from entropix.bench.speed import run_bench

    out = run_bench(models["deepseek_v2"], tokens=4, prompt_tokens=8, repeats=1)
    assert out["ratio"] > 0 and out["transformers_tps"] > 0 and out["new_tokens"] == 4
    # the mode each side was timed in stands beside the figures
    assert (out["quant"], out["dtype"], out["transformers_mode"]["dtype"]) == ("none", "float32", "float32")
    assert out["threads"] == out["transformers_mode"]["threads"] >= 1 and out["weights"]["dense"] > 0


def test_family_fields_read_from_the_configs(models):
    win, mis, ds = models["qwen2_window"].config, models["mistral"].config, models["deepseek_v2"].config
    assert (win.sliding_window, win.sliding_layers) == (6, (1, 2)) and win.qkv_bias and not win.o_bias
    assert mis.sliding_window == 8 and all(mis.slides(i) for i in range(3)) and mis.head_dim == 12
    assert models["qwen3"].config.qk_norm and not models["qwen3"].config.qkv_bias
    assert (ds.rope_type, ds.kv_lora_rank, ds.n_routed_experts, ds.first_k_dense_replace) == ("yarn", 20, 4, 1)
    assert [ds.is_moe_layer(i) for i in range(3)] == [False, True, True]


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory, gguf_path):
    from tiny import write_hf_model

    return write_hf_model(tmp_path_factory.mktemp("llama3") / "tiny", gguf_path)


@pytest.mark.slow  # each family end to end (the CLI and the server on the tiny Llama: test_cli*.py, test_server.py)
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_fp32_folders_keep_their_precision_under_the_defaults(family, folders, llama3_folder, capsys):
    """No --quant, --dtype or --device: a checkpoint stored in fp32 is computed as stored, so
    greedy text is transformers' own, token for token."""
    from entropix.backends.torch.quant import weight_kinds

    folder = llama3_folder if family == "llama3" else folders[family]
    res = cli_json(["generate", PROMPT, "--model", str(folder), "--raw", "--json", "--max-tokens", "24"], capsys)
    lm = load_model(str(folder), progress=False)
    assert lm.quant == "none" and lm.dtype == "float32" and weight_kinds(lm.model)["int4"] == 0
    ids = lm.tokenizer.encode(PROMPT)
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = hf_model(folder).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, min_new_tokens=24,
                                        do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert res["tokens"] == ref and len(ref) == 24


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "deepseek_v2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_explicit_quant_modes_load_every_family(family, mode, folders, models):
    """q/k/v biases (Qwen2), q/k norms (Qwen3), MLA and experts (DeepSeek-V2, which keep their own
    weights) under an explicit --quant: the logits stay close to fp32, CoT rows decode."""
    from entropix.sampler import catalog
    from entropix.decode.strategies import Task, decode, run

    lm, ref = load_model(str(folders[family]), progress=False, quant=mode), models[family]
    ids, mask = ragged(lm.config.vocab_size, [12, 5])
    a, _ = prefill(ref.model, ids, mask)
    b, _ = prefill(lm.model, ids, mask)
    assert torch.corrcoef(torch.stack([a[:, -1].flatten(), b[:, -1].flatten()]))[0, 1] > 0.95
    dec = catalog.resolve("cot", lm, branches=3)
    task = Task([ids[0, -12:].tolist(), ids[1, -5:].tolist()], [6, 6], [0, 0])
    res = run(lm.engine(dec.capture_layers), decode(dec, task, lm.tokenizer, 256))
    assert all(len(r["branches"]) == 3 and r["tokens_generated"] >= 18 for r in res)


@pytest.mark.parametrize("family, has", [("mistral", "a sliding window"), ("qwen2", "q/k/v biases"),
                                         ("qwen3", "q/k norms"), ("deepseek_v2", "latent attention, experts")])
def test_the_jax_backend_refuses_what_its_llama_block_would_compute_wrongly(family, has, folders, capsys):
    """The JAX model is Llama's block: it would drop biases, norms, windows and experts silently."""
    rc = main(["generate", "hi", "--model", str(folders[family]), "--backend", "jax", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"entropix: error: the jax backend runs Llama-style models; this {family} model "
                                   f"has {has}: use --backend torch")

"""Gemma 2 and Gemma 3 (text) against transformers, on tiny random checkpoints that transformers
writes here: logits over a ragged batch past the sliding window, greedy text through the CLI,
the attention statistics, fp32 kept under the defaults, the samplers, CoT and the server."""

from __future__ import annotations

import math

import pytest
import torch

from entropix import EntropixError
from entropix.config import ModelConfig
from entropix.loading import load_model

from family_parity import serve_entropix_and_cot, cli_json, fp32_models, tiny_folders, hf_greedy, hf_logits, hf_model, ragged
from tiny import write_gemma_model

FAMILIES = ["gemma2", "gemma3"]
PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have? The quick brown fox"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("gemma"), FAMILIES, write_gemma_model)


@pytest.fixture(scope="module")
def models(folders):
    return fp32_models(folders)


def ours_over_ragged(model, ids, mask, nxt):
    """Prefill of the left-padded batch, then one token per row per step."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    cache.starts = [int((m == 0).sum()) for m in mask]
    with torch.inference_mode():
        first, _ = model(ids, cache, last_only=False)
        steps = [model(nxt[:, j:j + 1], cache, last_only=False)[0] for j in range(nxt.shape[1])]
    return torch.cat([first] + steps, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_over_a_ragged_batch(family, folders, models):
    """Prefill (left-padded, lengths 23/14/6; the window is 8) and three decode steps, within 1e-4."""
    lm = models[family]
    c = lm.config
    assert c.sliding_window == 8 and 0 < len(c.sliding_layers) < c.num_hidden_layers  # a mix of both kinds
    lens = [23, 14, 6]
    ids, mask = ragged(c.vocab_size, lens)
    nxt = torch.randint(10, c.vocab_size, (3, 3), generator=torch.Generator().manual_seed(1))
    for eager in (False, True):  # transformers' SDPA and eager paths both
        ref = hf_logits(hf_model(folders[family], eager), torch.cat([ids, nxt], 1),
                        torch.cat([mask, torch.ones_like(nxt)], 1))
        ours = ours_over_ragged(lm.model, ids, mask, nxt)
        P = ids.shape[1]
        err = max((ours[b, P - n:] - ref[b, P - n:]).abs().max().item() for b, n in enumerate(lens))
        print(f"{family} eager={eager}: max |ours - transformers| = {err:.2e}")
        assert err < 1e-4, f"{family}: max |ours - transformers| = {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_identical_through_the_cli(family, folders, models, capsys):
    folder = folders[family]
    res = cli_json(["generate", PROMPT, "--model", str(folder), "--raw", "--json", "--max-tokens", "32",
                    "--device", "cpu", "--dtype", "float32"], capsys)
    ids = models[family].tokenizer.encode(PROMPT)
    assert len(ids) > 8 + 32 // 2  # the prompt alone outgrows the window
    assert res["usage"]["prompt_tokens"] == len(ids)
    ref = hf_greedy(folder, ids, 32)
    assert res["tokens"] == ref and len(ref) == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_folders_keep_their_precision_under_the_defaults(family, folders, capsys):
    """No --quant, --dtype or --device: an fp32 Gemma folder is computed in fp32, greedy text is transformers'."""
    from entropix.backends.torch.quant import weight_kinds

    folder = folders[family]
    res = cli_json(["generate", PROMPT, "--model", str(folder), "--raw", "--json", "--max-tokens", "24"], capsys)
    lm = load_model(str(folder), progress=False)
    assert lm.quant == "none" and lm.dtype == "float32" and weight_kinds(lm.model)["int4"] == 0
    ref = hf_greedy(folder, lm.tokenizer.encode(PROMPT), 24)
    assert res["tokens"] == ref and len(ref) == 24


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_statistics_match_transformers_attentions(family, folders, models):
    """Every layer's newest-query entropy and deviation per head equal those of transformers' attention
    matrices: a sliding layer over its window only, with Gemma's score scale and soft cap."""
    lm = models[family]
    c = lm.config
    ids, _ = ragged(c.vocab_size, [20], seed=7)
    with torch.inference_mode():
        att = hf_model(folders[family], eager=True)(ids, output_attentions=True).attentions
        _, stats = lm.model(ids, lm.model.new_cache(1, 20), capture_layers=tuple(range(c.num_hidden_layers)))
    for i in range(c.num_hidden_layers):
        p = att[i][:, :, -1].double()
        ent = -(p * torch.log2(p.clamp_min(1e-300))).sum(-1)
        assert torch.allclose(stats[i].entropy.double(), ent, atol=1e-4), i
        assert torch.allclose(stats[i].deviation.double(), (p - p.mean(1, keepdim=True)).abs().sum(-1), atol=1e-4)
        if c.slides(i):
            assert stats[i].entropy.max().item() <= math.log2(c.sliding_window) + 1e-4


def test_the_text_part_of_a_multimodal_gemma3_folder(tmp_path):
    """A `gemma3` image-text folder (nested text_config, language_model.* weights, a vision tower):
    its language model's logits equal transformers' on text."""
    import transformers
    from tiny import GEMMA, _save_tokenizer, small_tokenizer

    text = {k: v for k, v in GEMMA["gemma3"][2].items()}
    vocab = small_tokenizer().get_vocab_size()
    cfg = transformers.Gemma3Config(
        text_config=dict(text, vocab_size=vocab), mm_tokens_per_image=4, image_token_index=vocab - 1,
        boi_token_index=vocab - 3, eoi_token_index=vocab - 2,
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                           image_size=28, patch_size=14))
    torch.manual_seed(3)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08 if p.dim() >= 2 else 0.2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _save_tokenizer(tmp_path, "mistral")
    lm = load_model(str(tmp_path), device="cpu", dtype="float32", progress=False)
    assert lm.config.arch == "gemma3_text" and lm.config.rope_type == "linear"
    ids, _ = ragged(lm.config.vocab_size - 4, [21], seed=2)
    with torch.inference_mode():
        ref = hf(ids).logits
        ours, _ = lm.model(ids, lm.model.new_cache(1, 21), last_only=False)
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "gemma3n"}, "unsupported architecture 'gemma3n'"),
    ({"model_type": "gemma"}, "unsupported architecture 'gemma'"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "EmbeddingGemma"),
    ({"model_type": "gemma2", "hidden_activation": "relu"}, "unsupported Gemma activation 'relu'"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3n_text"}}, "unsupported Gemma 3 text model"),
])
def test_unsupported_gemma_variants_are_refused_in_one_line(raw, message):
    with pytest.raises(EntropixError, match=message) as e:
        ModelConfig.from_hf(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_entropix_sampler_and_cot_through_the_cli(family, folders, capsys):
    base = ["generate", PROMPT, "--model", str(folders[family]), "--json", "--max-tokens", "6", "--device", "cpu"]
    ent = cli_json(base + ["--sampler", "entropix", "--seed", "3"], capsys)
    assert 1 <= len(ent["tokens"]) <= 6 and len(ent["records"]) == len(ent["tokens"])
    from entropix.sampler.policy import ENTROPIX_STATES

    assert all(r["state"] in ENTROPIX_STATES for r in ent["records"])
    assert all(r["attn_entropy"] > 0 for r in ent["records"])  # the attention statistics reached the sampler
    cot = cli_json(base + ["--sampler", "cot", "--branches", "3"], capsys)
    assert "branches" in cot and len(cot["branches"]) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_server_end_to_end(family, models):
    serve_entropix_and_cot(models[family])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_explicit_quant_modes_load_gemma(family, mode, folders, models):
    """Under an explicit --quant the projections are quantized where the kernels take their shapes
    (the rest stay dense), the logits stay close to fp32 and CoT rows decode."""
    from entropix.backends.torch.quant import weight_kinds
    from entropix.decode.strategies import Task, decode, run
    from entropix.sampler import catalog

    lm, ref = load_model(str(folders[family]), progress=False, quant=mode), models[family]
    kinds = weight_kinds(lm.model)
    assert kinds["int8"] > 0 and (kinds["int4"] > 0) == (mode == "int4" and family == "gemma3"), kinds  # 48 / 72 wide
    ids, mask = ragged(lm.config.vocab_size, [12, 5])
    nxt = ids[:, :0]
    a, b = ours_over_ragged(ref.model, ids, mask, nxt), ours_over_ragged(lm.model, ids, mask, nxt)
    assert torch.corrcoef(torch.stack([a[:, -1].flatten(), b[:, -1].flatten()]))[0, 1] > 0.95
    dec = catalog.resolve("cot", lm, branches=3)
    task = Task([ids[0, -12:].tolist(), ids[1, -5:].tolist()], [6, 6], [0, 0])
    res = run(lm.engine(dec.capture_layers), decode(dec, task, lm.tokenizer, 256))
    assert all(len(r["branches"]) == 3 and r["tokens_generated"] >= 18 for r in res)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_compiled_step_leaves_gemma_eager(family, models):
    """The compiled decode step is Llama's: Gemma's blocks stay eager (their logits unchanged).
    Tensor parallelism: tests/test_tp.py::test_tp_runs_gemma_and_qwen3."""
    from entropix.backends.torch.compiled import compilable

    assert not any(compilable(b) for b in models[family].model.layers)

"""Peak host memory of loading a bf16 Hugging Face folder on the CPU.

Writes a random bf16 Llama folder (safetensors shards with an index, config.json, a
byte-level tokenizer) into a temporary directory, then loads it in a fresh process with
`load_model(folder, device="cpu", dtype="auto")` and prints one JSON object:

    file_bytes               bytes of the safetensors files
    rss_before               RSS after the imports, before loading
    rss_peak                 peak RSS of the process (getrusage ru_maxrss)
    peak_increase_over_file  (rss_peak - rss_before) / file_bytes; the target is <= 1.3
    dtype                    the parameters' dtype ("bfloat16" expected: auto keeps it on the CPU)
    seconds                  load time
    model_bytes, vm_hwm      the parameters' bytes; the child's own peak RSS (a cross-check)

    python benchmarks/bench_load.py [--layers 12 --hidden 1024 --intermediate 4096 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_folder(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, shards: int) -> int:
    """A random bf16 Llama checkpoint; returns the bytes of its safetensors files."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from entropix.io.tokenizer import bytes_to_unicode

    heads = max(1, hidden // 64)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    # The loader needs a tokenizer: 256 byte tokens are enough (the vocab rows are random).
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))

    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{name}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    names, weight_map, total = list(shapes), {}, 0
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):  # one shard in memory at a time
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
                for n in names[s * len(names) // shards:(s + 1) * len(names) // shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
        total += (folder / file).stat().st_size
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    """This process's own peak RSS (VmHWM), a cross-check of ru_maxrss."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(folder: str) -> dict:
    """Runs in the fresh process: RSS after the imports, then load and peak."""
    import resource

    import entropix.backends.torch.loader  # noqa: F401  (counted in rss_before, as torch is)
    from entropix.loading import load_model

    before = _rss_bytes()
    start = time.perf_counter()
    lm = load_model(folder, device="cpu", dtype="auto", progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in lm.model.parameters()})
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return dict(rss_before=before, rss_peak=peak, vm_hwm=_vm_hwm(), dtype=dtypes[0] if len(dtypes) == 1 else dtypes,
                model_bytes=model_bytes, seconds=round(seconds, 2))


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--write", metavar="FOLDER", help=argparse.SUPPRESS)  # child processes
    ap.add_argument("--measure", metavar="FOLDER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        size = write_folder(Path(args.write), args.layers, args.hidden, args.intermediate, args.vocab, args.shards)
        print(json.dumps({"file_bytes": size}))
        return
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    # Both steps run in children of this small process: a child started by vfork/exec
    # inherits its parent's peak RSS in ru_maxrss, which the writer's would swamp.
    shape = [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "intermediate", "vocab", "shards")]
    with tempfile.TemporaryDirectory(prefix="entropix-bench-load-") as tmp:
        folder = str(Path(tmp) / "bf16-llama")
        file_bytes = _child("--write", folder, *shape)["file_bytes"]
        child = _child("--measure", folder)
    result = dict(file_bytes=file_bytes, rss_before=child["rss_before"], rss_peak=child["rss_peak"],
                  peak_increase_over_file=round((child["rss_peak"] - child["rss_before"]) / file_bytes, 3),
                  dtype=child["dtype"], seconds=child["seconds"], model_bytes=child["model_bytes"],
                  vm_hwm=child["vm_hwm"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()

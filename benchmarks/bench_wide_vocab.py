"""The entropix sampler at Gemma 3's vocabulary width (262,144 tokens), against greedy, in one run.

Writes a random Gemma 3 (text) folder with a 262,144-token byte-level tokenizer (the model's own
256 bytes, then synthetic pieces: only the width matters here) and runs `entropix bench
--sampler entropix` on it: decode tokens/s of entropix and greedy, and their ratio. The layers
are small (4 x 640) so that the full-vocabulary softmax, entropy and top-k weigh as they do in
a real 1B model's step, not less.

    python benchmarks/bench_wide_vocab.py [--vocab 262144] [--tokens 64] [--out /tmp/wide-vocab]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [f"\u0120w{i}" for i in range(vocab - len(alphabet) - 2)] + ["<eos>", "<pad>"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<pad>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))


def write_model(folder: Path, vocab: int) -> None:
    import transformers

    cfg = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                        sliding_window=512, bos_token_id=None, eos_token_id=vocab - 2,
                                        pad_token_id=vocab - 1)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02 if p.dim() >= 2 else 0.2)
    model.save_pretrained(folder, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="/tmp/wide-vocab")
    args = ap.parse_args()
    folder = Path(args.out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_model(folder, args.vocab)
    write_tokenizer(folder, args.vocab)
    r = subprocess.run([sys.executable, "-m", "entropix.cli", "bench", "--model", str(folder), "--sampler", "entropix",
                        "--tokens", str(args.tokens), "--no-transformers", "--json"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr.strip().splitlines()[-1])
    print(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

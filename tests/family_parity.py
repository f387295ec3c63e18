"""What the family tests share: transformers' own run of a tiny folder (logits over a left-padded
batch, greedy text) and the CLI's JSON output."""

from __future__ import annotations

import json

import httpx
import torch

from entropix.cli import main


def tiny_folders(root, families, write) -> dict:
    """One tiny checkpoint per family, written by `write(folder, family)` under root."""
    return {f: write(root / f, f) for f in families}


def fp32_models(folders: dict) -> dict:
    """Each folder loaded by our engine in fp32 on the CPU, the references' precision."""
    from entropix.loading import load_model

    return {f: load_model(str(p), device="cpu", dtype="float32", progress=False) for f, p in folders.items()}


def hf_model(folder, eager: bool = False):
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def ragged(vocab: int, lens: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random ids [B, P] and their attention mask."""
    P = max(lens)
    ids = torch.randint(10, vocab, (len(lens), P), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lens), P, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, P - n:] = 1
    return ids, mask


def hf_logits(hf, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return hf(ids, attention_mask=mask, position_ids=pos).logits


def hf_greedy(folder, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = hf_model(folder).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def cli_json(args, capsys) -> dict:
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def serve_entropix_and_cot(lm) -> None:
    """The server on the model: an entropix chat answer with its metrics, and CoT branches as choices."""
    from entropix.serve import ServerThread, create_app

    with ServerThread(create_app(lm, max_rows=8, max_n=4)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        msgs = [{"role": "user", "content": "What is 3 + 4?"}]
        r = c.post("/v1/chat/completions", json={"model": lm.name, "messages": msgs, "max_tokens": 6,
                                                 "sampler": "entropix", "seed": 1})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["message"]["content"] and ch["entropix"]
        r = c.post("/v1/chat/completions", json={"model": lm.name, "messages": msgs, "max_tokens": 6,
                                                 "sampler": "cot", "branches": 2})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2

"""Shared fixtures: the embedded model is loaded once per test session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def lm():
    """The embedded SmolLM2-135M-Instruct dequantized to fp32 on the CPU: the reference that
    transformers' own fp32 load of the GGUF is compared with (the default weight mode has its
    own tests: test_quant.py, test_readme_commands.py, test_serve_concurrent.py)."""
    from entropix.loading import load_model

    return load_model(None, device="cpu", dtype="float32", progress=False, quant="none")


@pytest.fixture(scope="session")
def gguf_path():
    from entropix.io.source import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own load of the embedded GGUF: the reference for parity tests."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


# GSM8K-shaped data made here: the repository stands alone and never reads files beside it.
_GSM8K_PEOPLE = [("Mira", "she", "her"), ("Ines", "she", "her"), ("Tom", "he", "his"), ("Ravi", "he", "his"),
                 ("Lena", "she", "her"), ("Jamal", "he", "his"), ("Olga", "she", "her"), ("Pedro", "he", "his")]


def _gsm8k_row(rng: random.Random, kind: int) -> dict:
    """One word problem in GSM8K's format: the worked answer with <<a*b=c>> calculator notes and a
    final "#### N" line. "value" is the answer as computed here (the file itself leaves it out)."""
    name, he, his = rng.choice(_GSM8K_PEOPLE)
    if kind == 0:  # half as many, then the sum
        a = 2 * rng.randint(10, 60)
        h, v = a // 2, a + a // 2
        q = (f"{name} planted {a} tulip bulbs on Saturday and half that number on Sunday. "
             f"How many bulbs did {name} plant over the weekend?")
        a_text = (f"On Sunday {he} planted {a}/2 = <<{a}/2={h}>>{h} bulbs.\n"
                  f"Over the weekend {he} planted {a}+{h} = <<{a}+{h}={v}>>{v} bulbs.")
    elif kind == 1:  # always 1,000 or more: the final line carries a thousands separator, as some of GSM8K's do
        n, price, weeks = rng.randint(20, 90), rng.randint(25, 99), rng.randint(2, 5)
        w, v = n * price, n * price * weeks
        q = (f"{name} runs a bakery that sells {n} cakes a week at ${price} each. "
             f"How many dollars does the bakery take in over {weeks} weeks?")
        a_text = (f"Each week the bakery takes in {n} * {price} = $<<{n}*{price}={w}>>{w:,}.\n"
                  f"Over {weeks} weeks it takes in {w} * {weeks} = $<<{w}*{weeks}={v}>>{v:,}.")
    else:  # gifts out of a stock
        k, b = rng.randint(2, 6), rng.randint(3, 12)
        a = k * b + rng.randint(0, 40)
        g, v = k * b, a - k * b
        q = f"{name} had {a} stickers. {he.capitalize()} gave {b} stickers to each of {k} friends. How many stickers does {name} have left?"
        a_text = (f"{name} gave away {k} * {b} = <<{k}*{b}={g}>>{g} stickers.\n"
                  f"{name} has {a} - {g} = <<{a}-{g}={v}>>{v} stickers left.")
    return {"question": q, "answer": f"{a_text}\n#### {v:,}", "value": v}


@pytest.fixture(scope="session")
def gsm8k_rows():
    """40 GSM8K-style problems from a fixed seed, each {"question", "answer", "value"}."""
    rng = random.Random(400)
    return [_gsm8k_row(rng, i % 3) for i in range(40)]


@pytest.fixture(scope="session")
def gsm8k_path(tmp_path_factory, gsm8k_rows):
    """A GSM8K JSONL file (the real file's fields only: "question" and "answer") written to a tmp folder."""
    path = tmp_path_factory.mktemp("gsm8k") / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in gsm8k_rows))
    return path

"""Shared fixtures: the embedded model is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The CLI's --quant default is auto (int4 on a CPU); many tests compare CLI output with fp32
# references (transformers, our own fp32 model), so the suite runs the CLI in fp32 unless a
# test asks for a mode (tests/test_quant.py does).
os.environ.setdefault("ENTROPIX_QUANT", "none")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def lm():
    """The embedded SmolLM2-135M-Instruct in fp32 on the CPU."""
    from entropix.loading import load_model

    return load_model(None, device="cpu", dtype="float32", progress=False)


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


@pytest.fixture(scope="session")
def gsm8k_path():
    """The development GSM8K file that lies beside the repository (../shared/data)."""
    path = SHARED_DATA / "gsm8k_train_400.jsonl"
    assert path.is_file(), f"{path} is missing: the shared data folder must lie beside the repository"
    return path

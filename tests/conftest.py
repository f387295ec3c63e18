"""Shared fixtures and the suite's thread budget.

Fixture names mean one thing across the suite:
  smol       the embedded SmolLM2-135M-Instruct (fp32, --quant none), loaded once per test process
  tiny       a tiny random in-memory model (tests/tinymodel.py; files define their own, with their seed)
  tiny_hf    a tiny random checkpoint folder (tests/tiny.py), loaded through the real loaders

Threads: one per test process (and per subprocess a test starts, through OMP_NUM_THREADS). The
models here are small, `make test` runs two processes on two cores (pytest-xdist), and torch's
threads oversubscribe a busy machine badly (24 greedy tokens of the 135M model: 8.9 s with two
threads against 2.2 s with one). No ENTROPIX_* variable is set here: entropix's defaults stay.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before torch / numpy load their thread pools; subprocesses inherit it

# What test runs may keep for the next run: JAX's compiled programs (most of the JAX tests' time is
# XLA compiling) and transformers' build of the embedded GGUF's tokenizer (tests/tiny.py). Both are
# keyed by what they were built from; delete the folder to start cold.
CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "tests")  # in the checkout
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(CACHE, "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import functools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _pin_threads() -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(1)
    import torch

    torch.set_num_threads(1)


_pin_threads()

import tiny  # noqa: E402

tiny.SHARED_DIR = Path(CACHE) / "tokenizers"


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct dequantized to fp32 on the CPU: the reference that
    transformers' own fp32 load of the GGUF is compared with (the default weight mode has its
    own tests: test_quant.py, test_readme_commands.py, test_serve_concurrent.py)."""
    from entropix.loading import load_model

    return load_model(None, device="cpu", dtype="float32", progress=False, quant="none")


# -- pytest-xdist: `make test` runs two processes (-n 2 --dist loadgroup) -----------------------------
#
# xdist 3.8's own loadgroup reads `xdist_group` marks through an attribute of the test's id that
# pytest 9 no longer has, so every test would go its own way and module fixtures would be built
# in both processes. The scheduler below groups by test id instead: a module's tests run in one
# process (its module fixtures are built once), but for the modules that share a long session
# fixture (one group), the modules whose tests are independent and long (spread), and the
# README lines (tests/test_readme_commands.py: one group, the lines sharing one driver process).

_SHARED_GROUPS = {"test_model": "hf_model", "test_adapters_hf": "hf_model"}  # both use conftest's hf_model
_SPREAD = {"test_tp"}  # long tests (ranks, subprocesses) over a cheap module fixture


@functools.lru_cache(maxsize=1)
def _readme_groups() -> list[str]:
    import test_readme_commands

    return test_readme_commands.xdist_groups()


def _group(nodeid: str) -> str:
    path, _, rest = nodeid.partition("::")
    module = Path(path).stem
    if module == "test_readme_commands" and "[" in rest:
        return _readme_groups()[int(rest.split("[", 1)[1][:2])]
    if module in _SPREAD:
        return nodeid
    return _SHARED_GROUPS.get(module, path)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # the order of pytest_collection_modifyitems below
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """In xdist's workers: the groups holding slow tests go first, the largest first, so that the
    quick ones fill the gaps at the end instead of one long test running alone there."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(_group(item.nodeid), []).append(item)

    def cost(group: list) -> float:
        return sum(10.0 if it.get_closest_marker("slow") else 0.3 for it in group)

    items[:] = [it for _, group in sorted(groups.items(), key=lambda kv: -cost(kv[1])) for it in group]


_CLI_MODELS: dict[tuple, object] = {}  # this test process's models loaded by the CLI, by their flags


@pytest.fixture
def cli_load_once(monkeypatch, request):
    """In-process `entropix.cli.main([...])` calls load each model once per test process: the CLI's
    own `load` runs the first time a set of model flags is seen, later calls with the same flags
    get that model back (the fp32 embedded model is the session's `smol`). For tests of what a
    command does with its model. The README lines (tests/readme_driver.py) keep their own loads in
    their driver process; the subprocess tests run the CLI with its own load every time."""
    import importlib

    from entropix.backends.torch.quant import check_mode
    from entropix.cli import common

    real = common.load

    def load(args, quiet=False):
        backend, engine = getattr(args, "backend", "torch"), getattr(args, "engine", "entropix")
        if getattr(args, "tp", None) not in (None, 1) or engine != "entropix":
            return real(args, quiet)  # ranks and other engines are not shared
        if hasattr(args, "quant"):
            args.quant = check_mode(args.quant)  # as load does: a bad --quant fails here too
        key = (args.model or "default", backend, args.device, args.dtype, getattr(args, "quant", None),
               getattr(args, "dp", 1))
        if key not in _CLI_MODELS:
            if key == ("default", "torch", "cpu", "float32", "none", 1):
                _CLI_MODELS[key] = request.getfixturevalue("smol")
            else:
                _CLI_MODELS[key] = real(args, quiet)
        return _CLI_MODELS[key]

    for sub in ("generate", "chat", "eval", "calibrate"):
        monkeypatch.setattr(importlib.import_module(f"entropix.cli.{sub}"), "load", load)


@pytest.fixture(scope="session")
def gguf_path():
    from entropix.io.source import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own load of the embedded GGUF: the reference for parity tests. transformers takes
    ~15 s to read the GGUF's 49k-token metadata, so the weights it read are kept in the test cache
    (CACHE) and read back from there by later runs (tests/test_checkpoint.py runs transformers'
    GGUF loader every time, on a tiny file)."""
    import shutil

    import safetensors.torch
    import torch
    import transformers
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM

    saved = Path(CACHE) / "models" / f"{tiny.file_key(gguf_path)}-transformers{transformers.__version__}"
    def read():
        with tiny.gguf_read_once():
            return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                        dtype=torch.float32).eval()

    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return read()
    with FileLock(str(saved) + ".lock"):
        if not saved.is_dir():  # transformers will not save a model it read from a GGUF: its weights then
            model = read()
            part = saved.with_name(saved.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
            safetensors.torch.save_model(model, str(part / "model.safetensors"))
            (part / "config.json").write_text(model.config.to_json_string())
            part.rename(saved)
            return model
    config = AutoConfig.from_pretrained(saved)
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    safetensors.torch.load_model(model, str(saved / "model.safetensors"))
    return model.eval()


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



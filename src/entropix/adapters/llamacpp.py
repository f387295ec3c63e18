"""Entropix inside llama.cpp, through llama-cpp-python (`pip install entropix[llamacpp]`).

- `EntropixLogitsProcessor`: a llama-cpp-python `logits_processor` (numpy) for
  `Llama.generate` / `create_completion`; it forces the logits-only entropix choice.
- `LlamaCppBackend`: our Backend protocol over a `llama_cpp.Llama` (one row, token by
  token), so our host engine drives llama.cpp and yields the same TokenRecords as with
  our own backend (entropy, varentropy, margin, regime; no attention metrics). It is what
  `entropix generate --engine llama.cpp --model FILE.gguf` runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from .. import EntropixError
from ..backends.base import SampleGroup, StepHost
from ..sampler.policy import Entropix
from . import hooks, ops


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise EntropixError("the llama.cpp engine needs llama-cpp-python: `make install-llamacpp` "
                            "or pip install 'entropix[llamacpp]'") from e
    return llama_cpp


class EntropixLogitsProcessor:
    """For `Llama.generate(tokens, logits_processor=LogitsProcessorList([proc]))`: called with
    (input_ids, scores [V]) per token; returns scores that leave one token (the entropix
    choice). `sampler.history` holds (token, regime) per step."""

    def __init__(self, config: Any = None, seed: int | None = None, pause_id: int = -1,
                 model_name: str | None = None) -> None:
        self.sampler = hooks.LogitsSampler(hooks.entropix_policy(config, pause_id, model_name), seed)
        self._length = -1

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        n = len(input_ids)
        if n != self._length + 1:  # a new generation: the row's stream starts again
            self.sampler.reset()
        self._length = n
        return hooks.forced(scores, self.sampler(scores))


class LlamaCppBackend:
    """One sequence in a llama.cpp context. Forks and n > 1 need several sequences, which
    this adapter does not keep: select() only keeps or drops the row."""

    name = "llama.cpp"

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.vocab_size = int(llm.n_vocab())
        self.logits: np.ndarray | None = None  # [1, V]

    @property
    def rows(self) -> int:
        return 0 if self.logits is None else 1

    def _eval(self, tokens: Sequence[int]) -> None:
        llama_cpp = _llama_cpp()
        self.llm.eval(list(tokens))
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # the last evaluated token's logits
        self.logits = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).astype(np.float32)[None, :]

    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        if self.rows or len(prompts) != 1 or copies[0] != 1:
            raise EntropixError("the llama.cpp engine decodes one row at a time (no n > 1, forks or batches)")
        self.llm.reset()
        self._eval(prompts[0])

    def sample(self, groups: Sequence[SampleGroup], top_k: int) -> StepHost:
        return ops.sample(self.logits, groups, top_k)

    def select(self, rows: Sequence[int]) -> None:
        if list(rows) == []:
            self.logits = None
        elif list(rows) != [0]:
            raise EntropixError("the llama.cpp engine decodes one row at a time (no forks)")

    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        self._eval(tokens)


def open_llama(path: str, n_ctx: int = 4096, n_threads: int | None = None, **kw: Any) -> Any:
    """A quiet llama_cpp.Llama for a GGUF file. n_threads None: ENTROPIX_LLAMACPP_THREADS, else
    llama-cpp-python's default (half the cores): its threads spin while they wait, so more
    threads than free cores make every token many times slower."""
    llama_cpp = _llama_cpp()
    threads = n_threads or int(os.environ.get("ENTROPIX_LLAMACPP_THREADS", 0)) or None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           verbose=False, **kw)


@dataclasses.dataclass
class LlamaCppModel:
    """What `entropix generate` needs of a loaded model, with llama.cpp computing: our
    tokenizer and name from the GGUF (the same prompt ids and profile as our engine)."""

    name: str
    config: Any
    tokenizer: Any
    source: str
    llm: Any
    backend: str = "llama.cpp"
    device: str = "cpu"
    dtype: str = "gguf"

    def engine(self, capture_layers: tuple[int, ...] = (-1,)):
        from ..decode.engine import Engine

        return Engine(LlamaCppBackend(self.llm), self.tokenizer, int(self.llm.n_ctx()))


def load(spec: str | None, n_ctx: int = 4096) -> LlamaCppModel:
    """The GGUF that `spec` names (None: the embedded model) for llama.cpp."""
    from ..io.source import open_checkpoint

    ckpt = open_checkpoint(spec)
    if not str(ckpt.source).endswith(".gguf"):
        raise EntropixError(f"the llama.cpp engine reads GGUF files; {ckpt.source} is not one")
    cfg = ckpt.config
    llm = open_llama(ckpt.source, n_ctx=min(n_ctx, int(cfg.max_position_embeddings)))
    return LlamaCppModel(ckpt.name, cfg, ckpt.tokenizer, str(ckpt.source), llm)


def adapt_decoder(dec: Any) -> tuple[Any, str | None]:
    """The decoder llama.cpp can run, and a note when it had to change it: entropix runs
    from the logits alone; samplers of several rows are refused."""
    if dec.strategy != "single":
        raise EntropixError(f"the llama.cpp engine decodes one row; the {dec.name} sampler needs several "
                            "(use --engine entropix)")
    if isinstance(dec.policy, Entropix) and dec.policy.attention:
        dec = dataclasses.replace(dec, policy=hooks.logits_only(dec.policy))
        return dec, "llama.cpp gives logits only: entropix runs without attention metrics (as --no-attention)"
    return dec, None

"""Entropix inside transformers.

Two ways in:

- `EntropixLogitsProcessor`: for `model.generate(..., logits_processor=[proc])`. It runs
  the logits-only entropix choice (our torch sampler ops) per row, with each row's own
  random stream and pause budget, and leaves the generate loop a single token to take.
  Seeded, it chooses what `entropix generate --sampler entropix --no-attention --seed S`
  chooses from the same logits.
- `generate(model, tokenizer, prompt, ...)`: the full sampler, attention metrics included,
  on any causal LM that transformers loads: our host engine drives the model through a
  backend whose last-layer attention is eager attention that also hands us the newest
  query's statistics (the probabilities `output_attentions` returns, and the pre-softmax
  scores the interaction metric needs). It yields our TokenRecord stream.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .. import EntropixError
from ..backends.torch import ops as tops
from ..backends.torch.backend import TorchBackend
from ..backends.torch.layers import newest_query_stats
from ..decode.records import Request, TokenRecord
from ..sampler import catalog
from ..sampler.policy import Entropix
from . import hooks
from .tokenizers import HFTokenizer


# -- the logits processor ---------------------------------------------------------------------

class EntropixLogitsProcessor:
    """A transformers logits processor that makes the entropix choice for every row.

    config: a SamplerConfig, a profile dict or JSON path, or None (the built-in profile of
    model_name). pause_id: the pause token (-1: none; `pause_token_id(tokenizer)` finds the
    profile's). seed: row b draws from `row_seed(seed, b)`, as our engine's rows do.
    One processor serves one generate call at a time; it starts afresh when the input
    stops growing by one token per call. `history[b]` holds row b's (token, regime,
    entropy, varentropy) per step.
    """

    def __init__(self, config: Any = None, seed: int | None = None, pause_id: int = -1,
                 model_name: str | None = None) -> None:
        self.policy = hooks.entropix_policy(config, pause_id, model_name)
        self.seed = seed
        self.rows: list[hooks.RowState] | None = None
        self.history: list[list[tuple[int, str, float, float]]] = []
        self._length = -1
        self._table = None

    @property
    def config(self):
        return self.policy.config

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, L = input_ids.shape
        if self.rows is None or len(self.rows) != B or L != self._length + 1:
            self.rows, self.history = hooks.new_rows(self.seed, B), [[] for _ in range(B)]
        else:  # the token the loop appended since the last call (the one we forced)
            hooks.take(self.policy, self.rows, input_ids[:, -1].tolist())
        self._length = L
        tokens, codes, H, V = self._choose(scores)
        for b, (t, c) in enumerate(zip(tokens.tolist(), codes.tolist())):
            self.history[b].append((t, self.policy.regimes[c], float(H[b]), float(V[b])))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None].to(scores.device), 0.0)

    def _choose(self, scores: torch.Tensor):
        if self._table is None:
            self._table = tops.entropix_table_tensors(self.policy, scores.device)
        return choose_tokens(self.policy, self.rows, scores, self._table)


@torch.inference_mode()
def choose_tokens(policy: Entropix, rows: Sequence[hooks.RowState], scores: torch.Tensor, table: Any):
    """The logits-only entropix choice for rows whose next-token logits are scores [B, V], on the
    logits' device: (tokens [B], regime codes [B], entropy [B], varentropy [B]); consumes the rows'
    draws. `table`: tops.entropix_table_tensors(policy, device), built once per processor."""
    g = hooks.group(policy, rows)
    dev = scores.device
    logp, H, V = tops.logit_metrics(scores)
    K = min(policy.config.max_top_k, scores.shape[-1])
    top_id = tops.top_sorted(scores, max(K, 2))[1]  # by logit, ties by lower id, as every backend ranks
    top_lp = logp.gather(1, top_id)
    prev, ok = (torch.from_numpy(f).to(dev) if f.any() else None for f in (g.flags[:, 0], g.flags[:, 1]))
    u = torch.from_numpy(g.uniforms.astype(np.float32)).to(dev)
    attn = torch.zeros(scores.shape[0], 4, device=dev)  # logits only: the table gives them no weight
    tokens, codes = tops.entropix_tokens(table, policy, top_lp[:, :K], top_id[:, :K], H, V, attn, u, prev, ok)
    return tokens, codes, H.cpu().numpy(), V.cpu().numpy()


def pause_token_id(tokenizer: Any, config: Any = None, model_name: str | None = None) -> int:
    """The profile's pause token in a transformers tokenizer (as our tokenizer finds it)."""
    cfg = hooks.entropix_policy(config, -1, model_name).config
    return HFTokenizer(tokenizer).find_token(cfg.pause_text)


# -- the full sampler: our engine over a transformers model ---------------------------------

_SINK: contextvars.ContextVar[dict | None] = contextvars.ContextVar("entropix_attention_sink", default=None)
CAPTURE = "entropix_eager"


def _eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The model's own eager attention; for the captured layers also the newest query's
    statistics against the valid keys (the same function our torch model uses)."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is None:
        raise EntropixError(f"{type(module).__name__} has no eager attention to capture from")
    out = own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    sink = _SINK.get()
    if sink is not None and getattr(module, "layer_idx", None) in sink["layers"]:
        B, S = key.shape[0], key.shape[2]
        if attention_mask is None:
            valid = torch.ones(B, S, dtype=torch.bool, device=key.device)
        else:  # additive (0 = attend) or boolean (True = attend) mask of the newest query
            m = attention_mask[:, 0, -1, :S]
            valid = m if m.dtype == torch.bool else m == 0
        sink["stats"].append(newest_query_stats(query[:, :, -1], key, valid))
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(CAPTURE, _eager)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE, eager_mask)


class HFBackend(TorchBackend):
    """The Backend protocol over a transformers causal LM: its DynamicCache and logits; the
    sampler maths are the torch backend's own (inherited `sample`)."""

    name = "transformers"

    def __init__(self, model: Any, capture_layers: tuple[int, ...] = (-1,)) -> None:
        # the torch backend's state, set here: its constructor expects our Transformer
        _register()
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        n = int(model.config.get_text_config().num_hidden_layers)
        self.capture_layers = tuple(sorted({i % n for i in capture_layers}))
        self.device = model.device
        self.cache = self.logits = self.attn = self.attn_valid = None
        # transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def rows(self) -> int:  # transformers' cache keeps rows in order: no slots here
        return 0 if self.logits is None else int(self.logits.shape[0])

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, capture: bool):
        sink = {"layers": self.capture_layers, "stats": []} if capture else None
        token = _SINK.set(sink)
        own = self.model.config._attn_implementation
        self.model.config._attn_implementation = CAPTURE
        try:
            out = self.model(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: self.cache})
        finally:
            self.model.config._attn_implementation = own
            _SINK.reset(token)
        self.cache = getattr(out, self._cache_arg)
        B = ids.shape[0]
        stats = sink["stats"] if sink else []
        self.logits = out.logits[:, -1].float()
        self.attn = tops.attention_metrics(stats, B, self.device)
        self.attn_valid = torch.full((B,), bool(stats), device=self.device)

    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        if self.rows or len(prompts) != 1:
            raise EntropixError("the transformers adapter decodes one prompt at a time")
        self._forward(torch.tensor([list(prompts[0])], dtype=torch.long), capture)
        if copies[0] != 1:
            self.select([0] * copies[0])

    @torch.inference_mode()
    def select(self, rows: Sequence[int]) -> None:
        if not rows:
            self.cache = self.logits = self.attn = self.attn_valid = None
            return
        idx = torch.tensor(list(rows), device=self.device)
        self.cache.reorder_cache(idx)
        self.logits, self.attn, self.attn_valid = self.logits[idx], self.attn[idx], self.attn_valid[idx]

    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        self._forward(torch.tensor(list(tokens), dtype=torch.long)[:, None], capture)


def max_context(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "max_position_embeddings", None) or 1 << 20)


@dataclasses.dataclass
class _ModelInfo:
    """What the catalogue reads of a model: its name (for the profile) and its tokenizer."""

    name: str
    tokenizer: Any


def generate(model: Any, tokenizer: Any, prompt: str | Sequence[int], sampler: str = "entropix",
             max_tokens: int = 256, seed: int | None = None, chat: bool = True, model_name: str | None = None,
             top_logprobs: int = 5, n: int = 1, **params: Any) -> Iterator[TokenRecord]:
    """Decode one prompt (text, or token ids used as they are) with a catalogue sampler
    (`entropix` by default: the full sampler, attention metrics included; `entropix-branching`
    forks rows, records carry choice and parent) and yield our records. tokenizer: transformers' or one of ours. params: the sampler's options
    (temperature, top_p, sampler_config, ...)."""
    from ..decode.engine import Engine
    from ..decode.engine import generate as run

    tok = tokenizer if hasattr(tokenizer, "detokenizer") else HFTokenizer(tokenizer, model)  # ours, or transformers'
    info = _ModelInfo(model_name or getattr(model.config, "name_or_path", "") or "", tok)
    dec = catalog.resolve(sampler, info, strict=True, **params)
    if dec.strategy not in ("single", "branching"):  # forks are rows of one prompt: the cache repeats them
        raise EntropixError(f"the transformers adapter runs single-row samplers and entropix branching; "
                            f"{dec.name} is {dec.strategy}")
    if isinstance(prompt, str):
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    layers = dec.capture_layers if isinstance(dec.policy, Entropix) else (-1,)
    engine = Engine(HFBackend(model, layers), tok, max_context(model))
    req = Request(prompt=ids, policy=dec.policy, max_tokens=max_tokens, seed=seed, stop_ids=tok.stop_ids,
                  top_logprobs=top_logprobs, n=n, branching=dec.branching)
    yield from run(engine, [req])

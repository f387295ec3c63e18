"""The PyTorch backend: a Transformer, its KV cache and the pending logits of every row."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ... import EntropixError
from ...sampler.dslider import DSlider
from ...sampler.lookahead import Lookahead
from ...sampler.policy import Entropix, Greedy, Ranked, Sample
from ..base import SampleGroup, StepHost
from . import ops
from .dslider import DSliderStates
from .kvcache import KVCache
from .lookahead import lookahead_tokens
from .model import Transformer


class TorchBackend:
    name = "torch"

    def __init__(self, model: Transformer, capture_layers: tuple[int, ...] = (-1,)) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.capture_layers = tuple(capture_layers)
        self.device = model.device
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # [B, V] pending next-token logits
        self.attn: torch.Tensor | None = None  # [B, 4] attention metrics of the pending step
        self.attn_valid: torch.Tensor | None = None  # [B] bool: which rows captured them
        self._tables: dict[object, tuple[torch.Tensor, ...]] = {}  # EntropixTable -> its tensors here
        self._dslider = DSliderStates()  # per-row sampler state: forks, moves and leaves with its row

    @property
    def rows(self) -> int:
        return 0 if self.logits is None else self.logits.shape[0]

    # -- rows -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        n, P = len(prompts), max(len(p) for p in prompts)
        toks = torch.zeros(n, P, dtype=torch.long)
        cache = self.model.new_cache(n, P + 1)
        for b, p in enumerate(prompts):  # left-padded: every prompt ends in the last column
            toks[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
            cache.starts[b] = P - len(p)
        logits, stats = self.model(toks.to(self.device), cache, self._layers(capture))
        attn = ops.attention_metrics(list(stats.values()), n, self.device)
        valid = torch.full((n,), bool(stats), device=self.device)
        if any(c != 1 for c in copies):  # a request's rows share its prefill
            picks = [b for b, c in enumerate(copies) for _ in range(c)]
            cache.select(picks)
            idx = torch.tensor(picks, device=self.device)
            logits, attn, valid = logits[idx], attn[idx], valid[idx]
        if self.cache is None:
            self._dslider.clear()
            self.cache, self.logits, self.attn, self.attn_valid = cache, logits, attn, valid
            return
        self._dslider.add_rows(cache.batch)
        self.cache.append_rows_from(cache, list(range(cache.batch)))
        self.logits = torch.cat([self.logits, logits])
        self.attn = torch.cat([self.attn, attn])
        self.attn_valid = torch.cat([self.attn_valid, valid])

    @torch.inference_mode()
    def select(self, rows: Sequence[int]) -> None:
        if not rows:
            self.cache = self.logits = self.attn = self.attn_valid = None
            self._dslider.clear()
            return
        self.cache.select(list(rows))
        self._dslider.select(rows)
        idx = torch.tensor(list(rows), device=self.device)
        self.logits, self.attn, self.attn_valid = self.logits[idx], self.attn[idx], self.attn_valid[idx]

    @torch.inference_mode()
    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        t = torch.tensor(list(tokens), dtype=torch.long).to(self.device, non_blocking=True)
        self.logits, stats = self.model(t[:, None], self.cache, self._layers(capture))
        B = len(tokens)
        self.attn = ops.attention_metrics(list(stats.values()), B, self.device)
        self.attn_valid = torch.full((B,), bool(stats), device=self.device)

    def _layers(self, capture: bool) -> tuple[int, ...]:
        return self.capture_layers if capture else ()

    # -- sampling -----------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, groups: Sequence[SampleGroup], top_k: int) -> StepHost:
        logits = self.logits
        B = logits.shape[0]
        logp, H, V = ops.logit_metrics(logits)
        # one ranking serves the alternatives, the margin and every entropix group's candidates
        wide = [min(g.policy.config.max_top_k, self.vocab_size) for g in groups if isinstance(g.policy, Entropix)]
        wide += [min(g.policy.config.support, self.vocab_size) for g in groups if isinstance(g.policy, DSlider)]
        wide += [min(g.policy.candidates, self.vocab_size) for g in groups if isinstance(g.policy, Lookahead)]
        top_lp, top_id = logp.topk(max([top_k, 2] + wide), dim=-1)
        margin = top_lp[:, 0].exp() - top_lp[:, 1].exp()
        tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        codes = torch.zeros(B, dtype=torch.long, device=self.device)
        extras: dict[str, torch.Tensor] = {}  # a policy's decision quantities, NaN in other rows
        for g in groups:
            whole = len(g.rows) == B and list(g.rows) == list(range(B))
            idx = None if whole else torch.tensor(g.rows, device=self.device)

            def part(x: torch.Tensor) -> torch.Tensor:
                return x if idx is None else x.index_select(0, idx)

            tok, code, *more = self._policy(g, part(logits), part(H), part(V), part(self.attn), part(top_lp), part(top_id))
            for key, val in (more[0] if more else {}).items():
                extras.setdefault(key, torch.full((B,), float("nan"), device=self.device))[slice(None) if idx is None else idx] = val.float()
            if idx is None:
                tokens, codes = tok, code
            else:
                tokens[idx], codes[idx] = tok, code
        chosen = logp.gather(1, tokens[:, None])
        cols = [tokens[:, None], codes[:, None], chosen, H[:, None], V[:, None], margin[:, None],
                self.attn, self.attn_valid[:, None], top_id[:, :top_k], top_lp[:, :top_k]] + [v[:, None] for v in extras.values()]
        # The step's one device -> host transfer, in fp32 (MPS has no fp64; ids below 2^24 are exact).
        m = torch.cat([c.float() for c in cols], 1).cpu().numpy().astype(np.float64)
        host = StepHost.from_matrix(m, top_k)
        if extras:
            n = m.shape[1] - len(extras)
            host = dataclasses.replace(host, extra={k: m[:, n + j] for j, k in enumerate(extras)})
        return host

    def _policy(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id) -> tuple[torch.Tensor, torch.Tensor]:
        p, dev = g.policy, self.device
        zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=dev)
        if isinstance(p, Greedy):  # the argmax is the first of the alternatives already ranked
            return top_id[:, 0], zeros
        if isinstance(p, Sample):
            return ops.sample_tokens(p, logits, self._to_device(g.uniforms)), zeros
        if isinstance(p, Ranked):
            return ops.ranked_tokens(logits, self._to_device(g.ranks), int(np.max(g.ranks)) + 1)
        if isinstance(p, Entropix):
            table = p.table()  # cached per profile: equal profiles share one set of tensors here
            if table not in self._tables:
                if len(self._tables) >= 64:  # a server sees many sampler_configs: keep the newest
                    self._tables.pop(next(iter(self._tables)))
                self._tables[table] = ops.entropix_table_tensors(p, dev)
            prev, ok = (self._to_device(f) if f.any() else None for f in (g.flags[:, 0], g.flags[:, 1]))
            K = min(p.config.max_top_k, self.vocab_size)
            return ops.entropix_tokens(self._tables[table], p, top_lp[:, :K], top_id[:, :K], H, V, attn,
                                       self._to_device(g.uniforms), prev, ok)
        if isinstance(p, DSlider):
            K = p.config.support
            if K > self.vocab_size:
                raise EntropixError(f"dslider: support {K} exceeds the vocabulary ({self.vocab_size} tokens)")
            return self._dslider.step(p, self.rows, g.rows, top_lp[:, :K], top_id[:, :K], H * ops.LN2, V * ops.LN2 ** 2,
                                      self._to_device(g.uniforms))
        if isinstance(p, Lookahead):
            return lookahead_tokens(self.model, self.cache, p, g.rows, H, top_lp, top_id)
        raise TypeError(f"the torch backend has no ops for policy {type(p).__name__}")

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        if a.dtype == np.float64:  # uniforms: fp32 is what the draws compare against anyway
            a = a.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)

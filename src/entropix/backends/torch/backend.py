"""The PyTorch backend: a Transformer, its KV cache and the pending logits of every row."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from ... import EntropixError
from ...sampler.dslider import DSlider
from ...sampler.lookahead import Lookahead
from ...sampler.policy import Entropix, Greedy, Ranked, Sample
from ..base import (SampleGroup, StepHost, TableCache, candidates, pause_flags, policy_op, ranking_width,
                    step_blocks)
from . import ops
from .dslider import DSliderStates
from .kvcache import KVCache, SlotCache
from .lookahead import lookahead_tokens
from .model import Transformer


class TorchBackend:
    name = "torch"
    # Prompt tokens per prefill chunk when the engine interleaves long prompts with decode steps.
    # `benchmarks/bench_server.py --scenario chunks` (embedded model, 2 shared CPU cores): 128 and
    # 256 read ~52 tokens/s alike, 256 doubles the running streams' wait; 64 reads fewer per second.
    max_chunk = 128

    def __init__(self, model: Transformer, capture_layers: tuple[int, ...] = (-1,)) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.capture_layers = tuple(capture_layers)
        self.device = model.device
        self.cache: SlotCache | None = None
        self.slot: list[int] = []  # host row -> its slot in the cache
        self.logits: torch.Tensor | None = None  # [B, V] pending next-token logits (host order)
        self.attn: torch.Tensor | None = None  # [B, 4] attention metrics of the pending step
        self.attn_valid: torch.Tensor | None = None  # [B] bool: which rows captured them
        self._partial: dict[object, KVCache] = {}  # chunked prefills in progress
        self._dslider = DSliderStates()  # per-row sampler state: forks, moves and leaves with its row

    @property
    def rows(self) -> int:
        return len(self.slot)

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
        self._join(cache, [b for b, c in enumerate(copies) for _ in range(c)], logits, attn, bool(stats))

    @torch.inference_mode()
    def prefill_chunk(self, key: object, prompt: Sequence[int], start: int, stop: int, copies: int,
                      capture: bool) -> None:
        """Feed prompt[start:stop] of a prefill in progress; the last chunk (stop == len(prompt))
        adds its `copies` rows at the end, like prefill(). Optional: see backends.base."""
        if start == 0:
            self._partial[key] = self.model.new_cache(1, len(prompt) + 1)
        cache = self._partial[key]
        last = stop >= len(prompt)
        toks = torch.tensor([list(prompt[start:stop])], dtype=torch.long).to(self.device)
        logits, stats = self.model(toks, cache, self._layers(capture and last))
        if last:
            del self._partial[key]
            attn = ops.attention_metrics(list(stats.values()), 1, self.device)
            self._join(cache, [0] * copies, logits, attn, bool(stats))

    def drop_prefill(self, key: object) -> None:
        """Forget a chunked prefill in progress (its request was cancelled)."""
        self._partial.pop(key, None)

    def _join(self, cache: KVCache, picks: list[int], logits, attn, captured: bool) -> None:
        """New rows at the end of the batch: row picks[j] of `cache` becomes one row (rows share a prefill)."""
        if self.cache is None:
            self._dslider.clear()
            if picks == list(range(cache.batch)):  # each prefilled row once, in order: no copy
                self.cache = SlotCache.adopt(self.model.new_cache, cache)
            else:
                self.cache = SlotCache(self.model.new_cache, max(4, len(picks)), cache.capacity)
        self._dslider.add_rows(len(picks))
        adopted = self.cache.full is cache
        for b in picks:
            slot = b if adopted else self.cache.alloc()
            if not adopted:
                self.cache.put(slot, cache, b)
            self.slot.append(slot)
        idx = torch.tensor(picks, device=self.device)
        valid = torch.full((len(picks),), captured, device=self.device)
        new = (logits.index_select(0, idx), attn.index_select(0, idx), valid)
        if self.logits is None:
            self.logits, self.attn, self.attn_valid = new
        else:
            self.logits, self.attn, self.attn_valid = (torch.cat([a, b]) for a, b in
                                                       zip((self.logits, self.attn, self.attn_valid), new))

    @torch.inference_mode()
    def select(self, rows: Sequence[int]) -> None:
        """Keep rows: a dropped row's slot goes back to the free list (no copy of the others); a
        repeated row (a fork) gets a new slot holding a copy of its own cache."""
        rows = list(rows)
        if not rows:
            self.cache, self.slot = None, []
            self.logits = self.attn = self.attn_valid = None
            self._dslider.clear()
            return
        keep = {self.slot[r] for r in rows}
        for s in set(self.slot) - keep:  # free first: a fork may take a slot just given back
            self.cache.release(s)
        taken, slots = set(), []
        for r in rows:
            s = self.slot[r]
            if s in taken:
                dst = self.cache.alloc()
                self.cache.fork(dst, s)
                s = dst
            taken.add(s)
            slots.append(s)
        self.slot = slots
        self._dslider.select(rows)
        idx = torch.tensor(rows, device=self.device)
        self.logits, self.attn, self.attn_valid = self.logits[idx], self.attn[idx], self.attn_valid[idx]

    @torch.inference_mode()
    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        view = self.cache.view(1)
        top = view.batch
        toks = [0] * top  # a free slot below the top runs a dummy token that nobody reads
        for s, t in zip(self.slot, tokens):
            toks[s] = int(t)
        t = torch.tensor(toks, dtype=torch.long).to(self.device, non_blocking=True)
        logits, stats = self.model(t[:, None], view, self._layers(capture))
        self.cache.settle(view)
        B = len(tokens)
        attn = ops.attention_metrics(list(stats.values()), top, self.device)
        if self.slot == list(range(top)):
            self.logits, self.attn = logits, attn
        else:
            idx = torch.tensor(self.slot, device=self.device)
            self.logits, self.attn = logits.index_select(0, idx), attn.index_select(0, idx)
        self.attn_valid = torch.full((B,), bool(stats), device=self.device)

    def _layers(self, capture: bool) -> tuple[int, ...]:
        return self.capture_layers if capture else ()

    # -- sampling -----------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, groups: Sequence[SampleGroup], top_k: int) -> StepHost:
        logits = self.logits
        B = logits.shape[0]
        logp, H, V = ops.logit_metrics(logits)
        # one ranking serves the alternatives, the margin and every group's candidates
        top_id = ops.top_sorted(logits, ranking_width(groups, top_k, self.vocab_size))[1]
        top_lp = logp.gather(1, top_id)
        margin = top_lp[:, 0].exp() - top_lp[:, 1].exp()
        tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        codes = torch.zeros(B, dtype=torch.long, device=self.device)
        extras: dict[str, torch.Tensor] = {}  # a policy's decision quantities, NaN in other rows
        for g in groups:
            whole = len(g.rows) == B and list(g.rows) == list(range(B))
            idx = slice(None) if whole else torch.tensor(g.rows, device=self.device)

            def part(x: torch.Tensor) -> torch.Tensor:
                return x if whole else x.index_select(0, idx)

            op = policy_op(self._OPS, g.policy, self.name)
            tok, code, *more = op(self, g, part(logits), part(H), part(V), part(self.attn), part(top_lp), part(top_id))
            for key, val in (more[0] if more else {}).items():
                extras.setdefault(key, torch.full((B,), float("nan"), device=self.device))[idx] = val.float()
            tokens[idx], codes[idx] = tok, code
        chosen = logp.gather(1, tokens[:, None])[:, 0]
        blocks = step_blocks(tokens, codes, chosen, H, V, margin, self.attn, self.attn_valid, top_id[:, :top_k],
                             top_lp[:, :top_k], list(extras.values()))
        # The step's one device -> host transfer, in fp32 (MPS has no fp64; ids below 2^24 are exact).
        m = torch.cat([b.float() for b in blocks], 1).cpu().numpy().astype(np.float64)
        return StepHost.from_matrix(m, top_k, tuple(extras))

    @functools.cached_property
    def _entropix_tables(self) -> TableCache:
        """Each entropix policy's tensors here (made on first use: adapters/hf.py's subclass sets its
        own state instead of calling __init__)."""
        return TableCache(lambda p: ops.entropix_table_tensors(p, self.device))

    # The policies' ops (_OPS): (tokens, codes[, extras]) for one group's rows.
    def _greedy(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return top_id[:, 0], torch.zeros_like(top_id[:, 0])  # the argmax is the first of the ranking

    def _sample(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return ops.sample_tokens(g.policy, logits, self._to_device(g.uniforms)), torch.zeros_like(top_id[:, 0])

    def _ranked(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return ops.ranked_tokens(logits, self._to_device(g.ranks), int(np.max(g.ranks)) + 1)

    def _entropix(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        p = g.policy
        prev, ok = (None if f is None else self._to_device(f) for f in pause_flags(g))
        K = candidates(p, self.vocab_size)
        return ops.entropix_tokens(self._entropix_tables(p), p, top_lp[:, :K], top_id[:, :K], H, V, attn,
                                   self._to_device(g.uniforms), prev, ok)

    def _dslider_tokens(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        p, K = g.policy, g.policy.config.support
        if K > self.vocab_size:
            raise EntropixError(f"dslider: support {K} exceeds the vocabulary ({self.vocab_size} tokens)")
        return self._dslider.step(p, self.rows, g.rows, top_lp[:, :K], top_id[:, :K], H * ops.LN2, V * ops.LN2 ** 2,
                                  self._to_device(g.uniforms))

    def _lookahead(self, g: SampleGroup, logits, H, V, attn, top_lp, top_id):
        return lookahead_tokens(self.model, self.cache.view(g.policy.depth), g.policy, [self.slot[r] for r in g.rows],
                                H, top_lp, top_id)  # the slots' cache: rows are slots there

    _OPS = {Greedy: _greedy, Sample: _sample, Ranked: _ranked, Entropix: _entropix, DSlider: _dslider_tokens,
            Lookahead: _lookahead}

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        if a.dtype == np.float64:  # uniforms: fp32 is what the draws compare against anyway
            a = a.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)

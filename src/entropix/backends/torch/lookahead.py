"""Lookahead rollouts on the device: forks of the rows' KV cache, rolled out as one batch."""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ...sampler.lookahead import EXTRA_KEYS, Lookahead
from .kvcache import KVCache
from .model import Transformer


def _fork(cache: KVCache, picks: list[int], room: int) -> KVCache:
    """The picked rows (repeats allowed) as a new cache that shares nothing with `cache`, holding only
    the slots up to the longest pick plus `room`: copying the whole capacity of every rollout row
    was a sixth of lookahead's time (profiled on the embedded model, CPU, batch 10)."""
    fork = copy.copy(cache)
    keep = max(cache.lengths[p] for p in picks) + room
    if type(cache) is KVCache and keep < cache.capacity:  # other layouts (MLA's latents) copy whole
        fork.k, fork.v = cache.k[:, :, :, :keep], cache.v[:, :, :, :keep]
    fork.select(picks)  # index_select gathers into new tensors
    return fork


def lookahead_tokens(model: Transformer, cache: KVCache, policy: Lookahead, rows: Sequence[int], H: torch.Tensor,
                     top_lp: torch.Tensor, top_id: torch.Tensor):
    """(tokens, codes, extras) for a group's rows; H [n] in bits, top_lp / top_id [n, >= candidates].

    Which rows search is read on the host (one [n] transfer): only they fork, into a
    throw-away copy of their cache, so the rows themselves never see a rollout token.
    """
    n, c, d = H.shape[0], min(policy.candidates, top_id.shape[1]), policy.depth
    dev = H.device
    tokens, codes = top_id[:, 0].clone(), torch.zeros(n, dtype=torch.long, device=dev)
    forwards = torch.ones(n, device=dev)
    rollout_rows = torch.zeros(n, device=dev)
    score = torch.full((n,), float("nan"), device=dev)
    rank = torch.zeros(n, device=dev)
    need = (H >= policy.min_entropy).nonzero()[:, 0] if c > 1 else H.new_zeros(0, dtype=torch.long)
    if need.numel():
        picks = [rows[i] for i in need.tolist() for _ in range(c)]
        fork = _fork(cache, picks, d)
        cand = top_id.index_select(0, need)[:, :c].reshape(-1)
        lps, ents, feed = [top_lp.index_select(0, need)[:, :c].reshape(-1).float()], [], cand
        for t in range(d):
            logits, _ = model(feed[:, None], fork, ())
            logp = torch.log_softmax(logits.float(), -1)
            ents.append(-(logp.exp() * logp.clamp_min(-1e4)).sum(-1))
            if t < d - 1:
                feed = logp.argmax(-1)
                lps.append(logp.gather(1, feed[:, None])[:, 0])
        s = (torch.stack(lps, -1).mean(-1) - policy.entropy_weight * torch.stack(ents, -1).mean(-1)).view(-1, c)
        best = s.argmax(-1)
        tokens[need] = cand.view(-1, c).gather(1, best[:, None])[:, 0]
        codes[need] = 1
        forwards[need] = float(policy.forwards(True))
        rollout_rows[need] = float(c * d)
        score[need] = s.gather(1, best[:, None])[:, 0]
        rank[need] = best.float()
    return tokens, codes, dict(zip(EXTRA_KEYS, (forwards, rollout_rows, score, rank)))

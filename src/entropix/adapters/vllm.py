"""The entropix sampler inside vLLM (v1): a logits processor for the requests that opt in.

    vllm serve FOLDER --logits-processors entropix.adapters.vllm:EntropixLogitsProcessor
    client.completions.create(..., extra_body={"vllm_xargs": {"entropix_sampler": "entropix",
                                                             "entropix_seed": 7}})

A request opts in with `entropix_sampler` ("entropix"; the only one a logits hook runs) in its
extra arguments, optionally `entropix_seed` and `entropix_profile` (a profile name or JSON path).
For such a row the processor makes the logits-only entropix choice (`--no-attention`) from the
row's logits and leaves vLLM's sampler that one token; other rows pass untouched. Each row keeps
its own state across vLLM's batch changes (added, removed, moved), its tokens read from the
output list vLLM shares with the processor. Row c of a request with n > 1 and `seed` equal to
`entropix_seed` draws as our engine's row c does (vLLM seeds its children seed + c).

vLLM's responses have no room for the sampler's regimes; with ENTROPIX_VLLM_TRACE=FILE in the
server's environment the processor appends one JSON line per opted-in token to FILE (seed, row,
token, regime, entropy, varentropy), the records `entropix generate --json` prints.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .. import EntropixError
from ..backends.torch import ops as tops
from ..decode.rng import row_seed
from . import hooks
from .hf import choose_tokens

SAMPLERS = ("entropix", "entropix-logits")


@dataclass
class _Row:
    policy: Any
    state: hooks.RowState
    out: list[int]  # vLLM's running output tokens of the request (a shared reference)
    seed: int | None
    seen: int = 0


class EntropixLogitsProcessor(LogitsProcessor):
    """vLLM's logits processor interface over our per-row entropix state."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        check_engine(getattr(vllm_config, "speculative_config", None) is not None)
        mc = vllm_config.model_config
        self.tokenizer_path = mc.tokenizer
        self.model_name = str(getattr(mc, "served_model_name", None) or mc.model)
        self.rows: dict[int, _Row] = {}
        self.tables: dict[int, Any] = {}  # id(policy) -> its regime table on the logits' device
        self.trace = os.environ.get("ENTROPIX_VLLM_TRACE") or None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = sampling_params.extra_args or {}
        name = extra.get("entropix_sampler")
        if name is not None and name not in SAMPLERS:
            raise ValueError(f"entropix_sampler {name!r}: inside vLLM only {', '.join(SAMPLERS)} (logits only)")
        if name is not None:
            try:  # here, not in the engine loop: a bad profile is the request's 400, not the engine's crash
                profile(extra.get("entropix_profile"))
            except (EntropixError, OSError, ValueError, TypeError) as e:
                raise ValueError(f"entropix_profile: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def is_argmax_invariant(self) -> bool:
        return False  # it chooses tokens, greedy rows included

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for i in batch_update.removed:
                self.rows.pop(i, None)
            for i, params, _prompt, out in batch_update.added:
                row = self._new_row(params, out)
                if row is None:
                    self.rows.pop(i, None)
                else:
                    self.rows[i] = row
            for a, b, how in batch_update.moved:
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if how == MoveDirectionality.SWAP and rb is not None:
                    self.rows[a] = rb
        for r in self.rows.values():  # the tokens vLLM appended since the last step
            if len(r.out) > r.seen:
                hooks.take(r.policy, [r.state], r.out[r.seen:])
                r.seen = len(r.out)

    def _new_row(self, params: Any, out: list[int]) -> _Row | None:
        extra = params.extra_args or {}
        if extra.get("entropix_sampler") is None:
            return None
        base = extra.get("entropix_seed", params.seed)
        choice = 0
        if params.seed is not None and base is not None and 0 <= params.seed - int(base) < 1 << 16:
            choice = params.seed - int(base)  # a child of an n > 1 request
        policy = self._policy(extra.get("entropix_profile"))
        return _Row(policy, hooks.RowState(row_seed(base, choice), choice), out, base, len(out))

    @functools.lru_cache(maxsize=32)
    def _policy(self, name: str | None):
        cfg = profile(name)
        probe = hooks.entropix_policy(cfg, -1, self.model_name)
        return hooks.entropix_policy(cfg, self._pause_id(probe.config.pause_text), self.model_name)

    @functools.lru_cache(maxsize=32)
    def _pause_id(self, text: str) -> int:
        from transformers import AutoTokenizer

        from .tokenizers import HFTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(self.tokenizer_path)).find_token(text)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[int, list[int]] = {}
        for i, r in self.rows.items():
            groups.setdefault(id(r.policy), []).append(i)
        for idx in groups.values():
            rows = [self.rows[i] for i in idx]
            policy = rows[0].policy
            table = self.tables.get(id(policy))
            if table is None:
                table = self.tables[id(policy)] = tops.entropix_table_tensors(policy, logits.device)
            tokens, codes, H, V = choose_tokens(policy, [r.state for r in rows], logits[idx].float(), table)
            if self.trace:
                self._write_trace(rows, tokens.tolist(), codes.tolist(), H, V)
            sel = torch.tensor(idx, device=logits.device)
            logits[sel] = float("-inf")
            logits[sel, tokens.to(logits.device)] = 0.0
        return logits

    def _write_trace(self, rows: list[_Row], tokens: list[int], codes: list[int], H: Any, V: Any) -> None:
        from ..decode.engine import regime_name

        with open(str(self.trace), "a") as f:  # appended line by line: the file reads back whole at any time
            for r, t, c, h, v in zip(rows, tokens, codes, H, V):
                f.write(json.dumps({"seed": r.seed, "row": r.state.choice, "token": int(t),
                                    "regime": regime_name(r.policy, int(c)), "entropy": float(h),
                                    "varentropy": float(v)}) + "\n")


def profile(name: Any) -> Any:
    """A request's entropix_profile: a built-in profile's name, a JSON file, a dict of settings, or
    None (the model's own built-in profile)."""
    from ..sampler.config import SamplerConfig, builtin_profiles

    if name is None or isinstance(name, dict):
        return name
    found = builtin_profiles().get(str(name))
    return SamplerConfig.from_json(found if found is not None else str(name))


def check_engine(speculative: bool) -> None:
    """vLLM runs logits processors on the target model's rows only: speculative drafts would
    bypass the sampler's choices, so the processor refuses them."""
    if speculative:
        raise EntropixError("the entropix logits processor cannot run under speculative decoding")

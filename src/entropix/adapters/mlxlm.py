"""Entropix inside mlx-lm (`pip install entropix[mlx]`).

    from mlx_lm import load, generate
    from entropix.adapters.mlxlm import entropix_sampler
    model, tokenizer = load("mlx-community/SmolLM2-135M-Instruct")
    text = generate(model, tokenizer, "Why is the sky blue?", sampler=entropix_sampler(seed=1))

`entropix_sampler` is an mlx-lm sampler (log-probabilities [1, V] -> token [1]) and
`EntropixLogitsProcessor` a logits processor ((tokens, logits) -> logits) that forces
the same choice under any sampler. Both run the logits-only entropix policy with the
numpy maths every logits hook shares (`adapters/ops.py`): one host transfer of the
vocabulary row per token, which at batch 1 costs little next to the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import hooks


class EntropixSampler:
    """Call with mlx-lm's log-probabilities [1, V]; returns the chosen token [1] (uint32).
    `sampler.history` holds (token, regime) per step; `reset()` starts the stream again."""

    def __init__(self, config: Any = None, seed: int | None = None, pause_id: int = -1,
                 model_name: str | None = None) -> None:
        self.sampler = hooks.LogitsSampler(hooks.entropix_policy(config, pause_id, model_name), seed)

    def reset(self) -> None:
        self.sampler.reset()

    @property
    def history(self) -> list[tuple[int, str]]:
        return self.sampler.history

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        rows = np.array(logprobs.astype(mx.float32)).reshape(-1, logprobs.shape[-1])
        if rows.shape[0] != 1:
            raise ValueError("the entropix sampler keeps one row's state: decode one prompt at a time")
        return mx.array([self.sampler(rows[0])], dtype=mx.uint32)


def entropix_sampler(config: Any = None, seed: int | None = None, pause_id: int = -1,
                     model_name: str | None = None) -> EntropixSampler:
    return EntropixSampler(config, seed, pause_id, model_name)


class EntropixLogitsProcessor:
    """An mlx-lm logits processor: (tokens so far, logits [1, V]) -> logits that leave one
    token, the entropix choice; pair it with any sampler (mlx-lm's greedy takes it)."""

    def __init__(self, config: Any = None, seed: int | None = None, pause_id: int = -1,
                 model_name: str | None = None) -> None:
        self.sampler = hooks.LogitsSampler(hooks.entropix_policy(config, pause_id, model_name), seed)
        self._length = -1

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        n = int(tokens.size) if tokens is not None else 0
        if n != self._length + 1:  # a new generation
            self.sampler.reset()
        self._length = n
        row = np.array(logits.astype(mx.float32)).reshape(-1)
        return mx.array(hooks.forced(row, self.sampler(row)).reshape(logits.shape), dtype=logits.dtype)

"""JAX twins of the tiny in-memory models (tests/tinymodel.py): the same weights on a mesh."""

from __future__ import annotations

import jax.numpy as jnp

from entropix.backends.jax import sharding
from entropix.backends.jax.loader import build
from entropix.loading import LoadedModel


def jax_twin(lm: LoadedModel, tp: int = 1, dp: int = 1, dtype=jnp.float32) -> LoadedModel:
    """The torch LoadedModel's weights as a jax LoadedModel on a (dp, tp) mesh."""
    sd = {k: v.detach().float().numpy() for k, v in lm.model.state_dict().items()}
    model = build(lm.config, lambda name: sd[name], sharding.make_mesh(tp, dp), dtype)
    return LoadedModel(name=lm.name, config=lm.config, tokenizer=lm.tokenizer, source=lm.source, backend="jax",
                       model=model, device=model.device, dtype=model.dtype_name)

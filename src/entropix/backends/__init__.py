"""Backends that compute for the host engine (see base.py for the seam)."""

from __future__ import annotations

from typing import Any

from .. import EntropixError

BACKENDS = ("torch", "jax", "mlx")


def create_backend(lm: Any, capture_layers: tuple[int, ...] = (-1,)):
    """A fresh backend (empty batch) for a LoadedModel, on the backend it was loaded for."""
    if lm.backend == "torch":
        from .torch.backend import TorchBackend

        return TorchBackend(lm.model, capture_layers)
    if lm.backend == "jax":
        from .jax.backend import JaxBackend

        return JaxBackend(lm.model, capture_layers)
    if lm.backend == "mlx":
        from .mlx.backend import MLXBackend

        return MLXBackend(lm.model, lm.config, capture_layers)
    raise EntropixError(f"unknown backend {lm.backend!r} (known: {', '.join(BACKENDS)})")

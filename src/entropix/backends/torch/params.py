"""Filling a model built on the meta device with its checkpoint's tensors."""

from __future__ import annotations

import torch
from torch import nn

from ... import EntropixError


def place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter `name`, checking its shape."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    want = tuple(getattr(module, leaf).shape)
    if tuple(value.shape) != want:
        raise EntropixError(f"weights do not fit the model: {name} is {tuple(value.shape)}, the config wants {want}")
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))

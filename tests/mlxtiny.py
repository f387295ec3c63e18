"""MLX twins of the tiny torch models: the same weights in mlx-lm's modules, run by the mlx backend."""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from entropix.backends.mlx.loader import load_checkpoint
from entropix.io.checkpoint import Checkpoint, HostTensor
from entropix.loading import LoadedModel


class StateDictCheckpoint(Checkpoint):
    """A torch model's (unfused) parameters as a framework-free checkpoint."""

    def __init__(self, model) -> None:
        self.config, self.name, self.source, self.native_dtype = model.config, "tiny", "memory", "float32"
        self._sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def names(self) -> list[str]:
        return list(self._sd)

    def read(self, name: str) -> HostTensor:
        return HostTensor(self._sd[name], "float32")


def mlx_twin(lm: LoadedModel) -> LoadedModel:
    """The torch LoadedModel's weights in an mlx LoadedModel (fp32 on the CPU)."""
    mx.set_default_device(mx.cpu)
    model, cfg = load_checkpoint(StateDictCheckpoint(lm.model), mx.float32)
    return dataclasses.replace(lm, backend="mlx", model=model, config=cfg, device="cpu", dtype="float32")

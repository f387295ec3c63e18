"""Loading a model for a backend: `load_model(spec, backend=...)` -> LoadedModel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import EntropixError
from .backends import create_backend
from .config import ModelConfig
from .decode.engine import Engine

if TYPE_CHECKING:
    from .io.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model ready for one backend, with its tokenizer and where it came from."""

    name: str  # what profiles and the server call it
    config: ModelConfig
    tokenizer: Tokenizer  # entropix.io.tokenizer.Tokenizer (a protocol)
    source: str  # the file or folder the weights came from
    backend: str  # "torch", later "jax", "mlx"
    model: Any  # the backend's model object (torch: backends.torch.model.Transformer)
    device: str  # e.g. "cpu", "cuda:0"
    dtype: str  # e.g. "float32", "bfloat16"
    quant: str = "none"  # torch: weight-only quantized projections, "none" / "int8" / "int4"
    # torch tensor parallelism (backends.torch.ranks.Session) or a jax job of several processes
    # (backends.jax.multihost.Session): engines run on every rank / process
    session: Any = None

    def engine(self, capture_layers: tuple[int, ...] = (-1,)) -> Engine:
        """A host engine over a fresh backend for this model."""
        backend = self.session.backend(capture_layers) if self.session else create_backend(self, capture_layers)
        return Engine(backend, self.tokenizer, self.config.max_position_embeddings)

    @property
    def unavailable(self) -> str | None:
        """Why this model can no longer compute (a rank or process died or stalled), or None."""
        return self.session.dead if self.session else None

    def close(self) -> None:
        """Stop the tensor-parallel ranks or the job's other processes, if any."""
        if self.session:
            self.session.close()


def load_model(spec: str | None = None, *, backend: str = "torch", device: str | None = "auto",
               dtype: str | None = "auto", progress: bool = True, tp: int = 1, dp: int = 1,
               quant: str = "auto") -> LoadedModel:
    """Load a model (embedded default, GGUF file, HF folder or hub id) for a backend.

    tp, dp: the jax backend's device mesh (tensor-parallel and data-parallel devices).
    quant: torch only, none / int8 / int4 / auto (the CLI's default too: each tensor as the
    checkpoint stores it, see backends/torch/quant.py)."""
    if backend not in (*_LOADERS, "mlx"):
        raise EntropixError(f"unknown backend {backend!r} (known: {', '.join([*_LOADERS, 'mlx'])})")
    if backend != "jax" and (tp, dp) != (1, 1):  # torch's --tp: load_tensor_parallel
        raise EntropixError(f"--dp takes --backend jax, and --tp jax or torch (the {backend} backend runs on "
                            "one device)" if backend == "mlx" or dp != 1 else
                            "load_model runs the torch backend on one device: tensor parallelism goes through "
                            "load_tensor_parallel (entropix ... --tp N)")
    if backend == "mlx":  # reads folders through mlx-lm (more architectures, MLX quantized folders)
        from .backends.mlx.loader import load as load_mlx

        return LoadedModel(backend="mlx", **load_mlx(spec, device=device, dtype=dtype, progress=progress))
    mesh = {"tp": tp, "dp": dp} if backend == "jax" else {}
    if backend == "torch":
        mesh = {"quant": quant}
    elif quant not in (None, "none", "auto"):
        raise EntropixError(f"--quant {quant} takes --backend torch")
    from .io.source import open_checkpoint

    ckpt = open_checkpoint(spec)
    tokenizer = ckpt.tokenizer  # before the weights: a broken tokenizer fails at once
    model, config, dev, dt = _LOADERS[backend](ckpt, device, dtype, progress, **mesh)
    lm = LoadedModel(name=ckpt.name, config=config, tokenizer=tokenizer, source=ckpt.source,
                     backend=backend, model=model, device=dev, dtype=dt)
    if backend == "torch":
        from .backends.torch.quant import quant_mode

        lm.quant = quant_mode(model)
    return lm


def _load_torch(ckpt, device, dtype, progress, quant="none"):
    from .backends.torch.loader import load

    model = load(ckpt, device=device, dtype=dtype, progress=progress, quant=quant)
    # the model's config: a .bin folder without lm_head is found to be tied only while loading
    return model, model.config, str(model.device), str(model.dtype).removeprefix("torch.")


def _load_jax(ckpt, device, dtype, progress, tp=1, dp=1):
    try:
        from .backends.jax.loader import load
    except ImportError as e:
        raise EntropixError(f"the jax backend needs jax ({e}): pip install 'entropix[jax]'") from None

    model = load(ckpt, device=device, dtype=dtype, tp=tp, dp=dp, progress=progress)
    return model, model.config, model.device, model.dtype_name


def load_tensor_parallel(spec: str | None, tp: int | None = None, *, device: str | None = "auto",
                         dtype: str | None = "auto", exit_on_lost: bool = True,
                         peer_timeout: float | None = None) -> LoadedModel:
    """The torch model over `tp` ranks (spawned here, or torchrun's; see backends/torch/ranks.py).
    On torchrun's other ranks this never returns: they follow rank 0 and exit."""
    from .backends.torch.ranks import start

    session, ckpt = start(spec, tp, device=device, dtype=dtype, exit_on_lost=exit_on_lost, peer_timeout=peer_timeout)
    m = session.model
    return LoadedModel(name=ckpt.name, config=ckpt.config, tokenizer=ckpt.tokenizer, source=ckpt.source,
                       backend="torch", model=m, device=str(m.device), dtype=str(m.dtype).removeprefix("torch."),
                       session=session)


def load_jax_multihost(spec: str | None, tp: int = 1, dp: int = 1, *, device: str | None = "auto",
                       dtype: str | None = "auto", cluster: Any = None, peer_timeout: float | None = None,
                       exit_on_lost: bool = True) -> LoadedModel | None:
    """The jax model over a mesh that spans the job's processes (backends/jax/multihost.py), or
    None when the job has one process. On processes 1..N-1 this never returns: they follow
    process 0 and exit."""
    try:
        from .backends.jax import multihost
    except ImportError as e:
        raise EntropixError(f"the jax backend needs jax ({e}): pip install 'entropix[jax]'") from None
    from .backends.peers import DEFAULT_TIMEOUT_S

    started = multihost.start(spec, tp, dp, device=device, dtype=dtype, cluster=cluster or multihost.Cluster(),
                              peer_timeout=DEFAULT_TIMEOUT_S if peer_timeout is None else peer_timeout,
                              exit_on_lost=exit_on_lost)
    if started is None:
        return None
    session, ckpt = started
    m = session.model
    return LoadedModel(name=ckpt.name, config=ckpt.config, tokenizer=ckpt.tokenizer, source=ckpt.source,
                       backend="jax", model=m, device=m.device, dtype=m.dtype_name, session=session)


# backend name -> (checkpoint, device, dtype, progress) -> (model, config, device, dtype names)
_LOADERS = {"torch": _load_torch, "jax": _load_jax}

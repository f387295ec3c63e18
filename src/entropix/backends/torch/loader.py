"""Building the PyTorch Transformer from a Checkpoint, one tensor at a time.

The model is created on the meta device (no memory), then each parameter is read from the
checkpoint, converted to the target dtype and device and put in place before the next one
is read, so the host holds the model plus one tensor at most.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ... import EntropixError
from ...config import ModelConfig
from ...io.checkpoint import Checkpoint, HostTensor
from . import quant as q
from .model import Transformer
from .params import place

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> torch.device:
    """CUDA, then MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EntropixError(f"unknown device {device!r} (try auto, cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EntropixError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EntropixError(f"device {device!r} asked for, but MPS is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, native: str = "float32") -> torch.dtype:
    """"auto": bf16 on CUDA, fp16 on MPS, and on the CPU the dtype the weights are stored in,
    except fp16, which is widened to fp32 (half-precision matmuls are slow on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32 if native == "float16" else DTYPES[native]
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, DTYPES[native])
    if dtype not in DTYPES:
        raise EntropixError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def host_to_torch(t: HostTensor) -> torch.Tensor:
    """A CPU tensor sharing the host array's memory (bf16 bits reinterpreted, not copied)."""
    out = torch.from_numpy(t.array)
    return out.view(torch.bfloat16) if t.dtype == "bfloat16" else out


class _FromCheckpoint:
    """Tensors read lazily through the framework-free checkpoint."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.config, self.native_dtype = ckpt, ckpt.config, ckpt.native_dtype

    def get(self, name: str) -> torch.Tensor:
        return host_to_torch(self.ckpt.read(name))

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Only [start, stop) of dimension `dim` (a tensor-parallel rank's part)."""
        return host_to_torch(self.ckpt.read_slice(name, dim, start, stop))


class _FromTorchFiles:
    """pytorch_model*.bin folders: pickles only torch can read, memory-mapped and not executed."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.source, self.tensors = ckpt.source, {}
        for f in ckpt.torch_files:
            try:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise EntropixError(f"cannot read {f}: {first}") from None
            self.tensors.update({k.removeprefix("model."): v for k, v in sd.items()})
        cfg = ckpt.config
        if "lm_head.weight" not in self.tensors and not cfg.tie_word_embeddings:
            cfg = cfg.replace(tie_word_embeddings=True)  # no lm_head stored: it is tied
        self.config = cfg
        embed = self.tensors.get("embed_tokens.weight")
        native = str(embed.dtype).removeprefix("torch.") if embed is not None else "float32"
        self.native_dtype = native if native in ("float32", "float16", "bfloat16") else "float32"

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise EntropixError(f"{self.source}: weights lack {name}")
        return self.tensors[name]

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.get(name).narrow(dim, start, stop - start)  # memory-mapped: only these pages are read


def tensor_source(ckpt: Checkpoint) -> _FromCheckpoint | _FromTorchFiles:
    """Where a loader reads tensors (get / get_slice), its config and native dtype."""
    return _FromTorchFiles(ckpt) if ckpt.torch_files else _FromCheckpoint(ckpt)


def _parameter_names(model: Transformer, cfg: ModelConfig) -> list[str]:
    # a tied lm_head is the embedding: finish_setup() points it there
    return [n for n, _ in model.named_parameters() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]


def load(ckpt: Checkpoint, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
         fuse: bool | None = None, progress: bool = True, quant: str = "none") -> Transformer:
    """The checkpoint's model on `device` in `dtype`, in eval mode.

    fuse: q/k/v and gate/up as one matmul each. None means yes on a single device, which
    is what this loads onto (a tensor-parallel load passes False: it slices them apart).
    quant: "int8" / "int4" weight-only projections (quant.py; CPU), built module by module;
    "auto" keeps each tensor as the checkpoint stores it (quant.resolve, quant.kind_of).
    """
    dev = resolve_device(device)
    src = tensor_source(ckpt)
    dt = resolve_dtype(dtype, dev, src.native_dtype)
    fuse = True if fuse is None else fuse
    quant = q.resolve(quant, dev, ckpt)
    q.check_device(quant, dev)
    with torch.device("meta"):
        model = Transformer(src.config)
    groups = _by_fusable(model, _parameter_names(model, src.config))
    for owner, names in _progress(groups, progress, f"loading {ckpt.name}"):
        part = model.get_submodule(owner) if owner is not None else None
        if quant != "none" and q.quantizable(part):
            q.load_owner(part, owner, names, lambda n: src.get(n).to(device=dev, dtype=dt), src, quant, fuse, dt)
            continue
        for name in names:
            # MoE routers score in fp32 whatever the weights' dtype, as DeepSeek's code does
            want = torch.float32 if name.endswith("mlp.gate.weight") else dt
            place(model, name, src.get(name).to(device=dev, dtype=want))
        if fuse and owner is not None:
            # Each attention / MLP is fused as soon as it is loaded (what Transformer.fuse()
            # does at the end), so the freed q/k/v and gate/up buffers are reused by the
            # next reads instead of piling up beside the fused copies.
            model.get_submodule(owner).fuse()
    freqs = ckpt.rope_freq_factors
    model.finish_setup(torch.from_numpy(freqs) if freqs is not None else None)
    quantized = quant != "none" and q.quantize_output(model, quant, src=src)
    if fuse and not quantized:  # a single-device load: the output projection may take the CPU's packed layout
        model.pack_output()
    return model.eval()


def _fusable_owner(model: nn.Module, name: str) -> str | None:
    """The nearest module above parameter `name` that can fuse() its projections (the
    model itself excluded), or None."""
    parts = name.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if hasattr(model.get_submodule(prefix), "fuse"):
            return prefix
    return None


def _by_fusable(model: nn.Module, names: list[str]) -> list[tuple[str | None, list[str]]]:
    """Parameter names in the model's order, in runs that share a fusable owner."""
    groups: list[tuple[str | None, list[str]]] = []
    for name in names:
        owner = _fusable_owner(model, name)
        if groups and groups[-1][0] == owner:
            groups[-1][1].append(name)
        else:
            groups.append((owner, [name]))
    return groups


def _progress(it, enabled: bool, desc: str):
    if not enabled or not sys.stderr.isatty():
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="module", leave=False, file=sys.stderr)

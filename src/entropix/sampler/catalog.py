"""The one table of samplers: names, defaults, options, strategies, regimes and needs.

The CLI, the server, the evaluation, the bench and the playground resolve a sampler name
here and nowhere else: `parameters(name, ...)` merges the user's values over the
defaults and checks them (no model needed); `build(name, params, model)` turns them into
a `Decoder` (the token policy, the strategy and its settings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import EntropixError
from .config import BranchingConfig, SamplerConfig, SamplingParams, check_params, load_profile
from .policy import ENTROPIX_REGIMES, Entropix, Greedy, Ranked, Sample, TokenPolicy

FILTERS = ("temperature", "top_k", "top_p", "min_p")
OPTION_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                "samples": "--samples", "branches": "--branches", "aggregate": "--aggregate",
                "sampler_config": "--sampler-config"}
MAX_ROWS_PER_PROMPT = 64


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    help: str
    strategy: str  # "single", "cot", "self-consistency", "deepconf", "sc-early", "branching" or "auto"
    policy: Callable[[Mapping[str, Any], Any], TokenPolicy]  # (params, model or None) -> policy
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()  # parameters the user may set
    regimes: tuple[str, ...] = ("greedy",)  # the per-token decisions its records name (TokenPolicy.regimes)
    needs_attention: bool = False
    aliases: tuple[str, ...] = ()
    listed: bool = True  # offered in the playground's list

    @property
    def text(self) -> str:
        """The help with its defaults filled in ({branches}, {samples}, {temperature}, ...)."""
        return self.help.format(**self.defaults)


@dataclass(frozen=True, eq=False)
class Decoder:
    """A resolved sampler: what the engine and the strategies need to run it."""

    spec: SamplerSpec
    params: Mapping[str, Any]  # defaults merged with the user's values
    policy: TokenPolicy
    branching: BranchingConfig | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def strategy(self) -> str:
        return self.spec.strategy

    @property
    def rows_per_prompt(self) -> int:
        """Rows one prompt occupies (entropy-triggered branching: a quarter of its cap, as it forks now and then)."""
        if self.strategy in ("cot", "auto"):  # auto: at most (most prompts take one row)
            return self.params["branches"]
        if self.strategy in ("self-consistency", "deepconf", "sc-early"):
            return self.params["samples"]
        if self.branching is not None:
            return max(1, self.branching.max_rows // 4)
        return 1

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return self.policy.config.attention_layers if isinstance(self.policy, Entropix) else (-1,)

    def thresholds(self) -> dict[str, float] | None:
        """The (entropy, varentropy) quadrant thresholds this decoder uses, if any."""
        return config_thresholds(self.policy.config) if isinstance(self.policy, Entropix) else None


THRESHOLD_KEYS = ("low_ent", "med_ent", "high_ent", "low_vent", "med_vent", "high_vent")


def config_thresholds(cfg: SamplerConfig) -> dict[str, float]:
    """An entropix profile's (entropy, varentropy) quadrant thresholds."""
    return {k: getattr(cfg, k) for k in THRESHOLD_KEYS}


# -- policy builders ---------------------------------------------------------------------

def _plain(params: Mapping[str, Any], model: Any) -> TokenPolicy:
    sp = SamplingParams(**{k: params[k] for k in FILTERS if params.get(k) is not None})
    return Greedy() if sp.greedy else Sample(sp)


def entropix_config(params: Mapping[str, Any], model: Any) -> SamplerConfig:
    """The profile (given, or the built-in one for the model) with the user's base parameters."""
    given = params.get("sampler_config")
    if isinstance(given, SamplerConfig):
        cfg = given
    elif isinstance(given, dict):
        cfg = SamplerConfig.from_dict(given)
    elif given is not None:
        cfg = SamplerConfig.from_json(given)
    else:
        cfg = load_profile(getattr(model, "name", None))
    over = {k: params[k] for k in FILTERS if params.get(k) is not None}
    if not over:
        return cfg
    if over.get("temperature", 1) == 0:
        raise EntropixError("the entropix sampler needs a base temperature above 0 (use --sampler greedy for argmax)")
    if over.get("top_k", 1) == 0:
        over["top_k"] = cfg.max_top_k  # 0 means "off" elsewhere: here, the widest allowed
    if over.get("top_k", 1) > cfg.max_top_k:
        over["max_top_k"] = over["top_k"]
    if over.get("temperature", 0) > cfg.max_temperature:
        over["max_temperature"] = over["temperature"]
    return dataclasses.replace(cfg, **over)


def _entropix(params: Mapping[str, Any], model: Any) -> Entropix:
    cfg = entropix_config(params, model)
    pause_id = model.tokenizer.find_token(cfg.pause_text) if model is not None else -1
    return Entropix(cfg, pause_id)


def _entropix_logits(params: Mapping[str, Any], model: Any) -> Entropix:
    return dataclasses.replace(_entropix(params, model), attention=False)


def _dslider(params: Mapping[str, Any], model: Any) -> TokenPolicy:
    from .dslider import DSlider, DSliderConfig, load_dslider_profile

    given = params.get("sampler_config")
    if isinstance(given, DSliderConfig):
        return DSlider(given)
    if isinstance(given, dict):
        return DSlider(DSliderConfig.from_dict(given))
    if given is not None:
        return DSlider(DSliderConfig.from_json(given))
    return DSlider(load_dslider_profile(getattr(model, "name", None)))  # calibrated for the model, else the spec's


def _lookahead(params: Mapping[str, Any], model: Any) -> TokenPolicy:
    from .lookahead import Lookahead

    given = params.get("sampler_config")
    return Lookahead.from_dict(given) if isinstance(given, dict) else Lookahead.from_json(given) if given else Lookahead()


def _greedy(params: Mapping[str, Any], model: Any) -> TokenPolicy:
    return Greedy()


def _ranked(params: Mapping[str, Any], model: Any) -> TokenPolicy:
    return Ranked()


_ENTROPIX_OPTIONS = ("sampler_config",) + FILTERS
AUTO_DEFAULTS = {"branches": 5, "score": "votes", "margin": 0.0, "gate_confidence": 0.3}  # dev-calibrated: docs/results-compute-dev/analysis.md
SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("greedy", "always the most likely token", "single", _greedy, aliases=("argmax",)),
    SamplerSpec("sample", "temperature sampling with top-k, top-p and min-p filters (T={temperature})", "single", _plain,
                {"temperature": 1.0}, FILTERS, ("sample",), aliases=("plain", "top-p", "top-k")),
    SamplerSpec("temperature", "plain sampling, T={temperature}", "single", _plain, {"temperature": 0.7}, FILTERS,
                ("sample",), listed=False),
    SamplerSpec("min-p", "min_p {min_p} at T={temperature}", "single", _plain, {"temperature": 1.0, "min_p": 0.1}, FILTERS,
                ("sample",), listed=False),
    SamplerSpec("entropix", "a regime per token from the entropy and varentropy of the distribution", "single", _entropix, {}, _ENTROPIX_OPTIONS,
                ENTROPIX_REGIMES, needs_attention=True),
    SamplerSpec("entropix-branching", "entropix with entropy-triggered branching", "branching", _entropix, {},
                _ENTROPIX_OPTIONS, ENTROPIX_REGIMES, needs_attention=True, listed=False),
    # what a logits hook in another engine (transformers, llama.cpp, mlx-lm) can run: src/entropix/adapters
    SamplerSpec("entropix-logits", "entropix from the logits alone (no attention metrics)", "single", _entropix_logits,
                {}, _ENTROPIX_OPTIONS, ENTROPIX_REGIMES, listed=False, aliases=("entropix-no-attention",)),
    SamplerSpec("cot", "CoT decoding: branch on the top first tokens, decode each greedily, keep the most confident answer ({branches} branches, max path)", "cot", _ranked,
                {"branches": 10, "aggregate": False}, ("branches", "aggregate"), Ranked.regimes,
                aliases=("cot-decoding",)),
    SamplerSpec("cot-agg", "CoT decoding, aggregated path ({branches} branches)", "cot", _ranked, {"branches": 10, "aggregate": True},
                ("branches",), Ranked.regimes, listed=False),
    SamplerSpec("self-consistency", "several seeded samples in one batch, the majority answer wins ({samples} samples, T={temperature})", "self-consistency", _plain,
                {"samples": 5, "temperature": 0.7}, ("samples",) + FILTERS, ("sample",),
                aliases=("self_consistency", "sc")),
    # self-consistency's samples for less (decode/deepconf.py). keep, window and consensus were chosen on development
    # seed 1 by replaying full self-consistency-16 traces (benchmarks/deepconf_dev.py, 40 problems of letters, coinflip,
    # decimals, compare): 58 right against its 54 with 50% of its tokens (docs/results-compute-dev/voting)
    SamplerSpec("deepconf", "confidence-pruned voting: {warmup} warm-up samples set a confidence threshold and stop "
                "the vote where one answer holds {consensus} of their weight; else the rest of the {samples} stop where "
                "{window} tokens in a row fall below it; a confidence-weighted vote (T={temperature})",
                "deepconf", _plain, {"samples": 16, "temperature": 0.7, "warmup": 4, "window": 12, "keep": 0.1,
                                     "consensus": 0.6},
                ("samples",) + FILTERS, ("sample",)),
    SamplerSpec("sc-early", "early-stopping self-consistency: {first} samples, and the rest of the {samples} only if "
                "they disagree; the majority answer wins (T={temperature})", "sc-early", _plain,
                {"samples": 16, "temperature": 0.7, "first": 4}, ("samples",) + FILTERS, ("sample",)),
    # calibrated on development data: benchmarks/compute_experiments.py, docs/RESULTS.md
    SamplerSpec("auto", "greedy, and {branches} CoT branches (greedy's among them) where the greedy answer's confidence is below "
                "{gate_confidence}; another answer replaces greedy's only if its {score} beat greedy's by more than {margin}", "auto",
                _ranked, AUTO_DEFAULTS, ("branches",), Ranked.regimes),
    SamplerSpec("dslider", "DSlider (entropix v5): running entropy statistics and a Dirichlet over the top-K choose argmax, "
                "entropy-targeted sampling or a Dirichlet-perturbed draw", "single", _dslider, {}, ("sampler_config",),
                ("argmax", "inlier", "dirichlet", "ood"), aliases=("entropix-v5",)),
    SamplerSpec("lookahead", "a small tree search where the model is unsure: the top 4 tokens each rolled out 3 tokens "
                "in one batch, the one with the most likely and least uncertain rollout kept", "single", _lookahead, {},
                ("sampler_config",),
                ("calm", "search"), aliases=("tree-search", "mcts")),
)
_BY_NAME = {n: s for s in SPECS for n in (s.name, *s.aliases)}


def describe(listed_only: bool = True) -> list[dict[str, Any]]:
    """The table as JSON for front ends (the playground builds its form from it)."""
    return [{"name": s.name, "help": s.text, "strategy": s.strategy, "options": list(s.options),
             "defaults": dict(s.defaults), "regimes": list(s.regimes),
             "states": list(s.regimes)}  # "states": the older name of "regimes", kept for readers of it
            for s in SPECS if s.listed or not listed_only]


# Flags that turn a sampler into its variant: (name, flag) -> the variant's name.
VARIANTS = {("entropix", "branching"): "entropix-branching", ("cot", "aggregate"): "cot-agg",
            ("entropix", "no_attention"): "entropix-logits"}


def variant(name: str, **flags: bool) -> str:
    """The catalogue name for a sampler with flags such as --branching or --aggregate set."""
    base = spec(name).name
    for flag, on in flags.items():
        if on and (base, flag) in VARIANTS:
            return VARIANTS[(base, flag)]
    return base


def default_of(key: str) -> Any:
    """A parameter's catalogue default (the first sampler that has one), for help texts."""
    return next(s.defaults[key] for s in SPECS if key in s.defaults)


def names(listed_only: bool = False) -> list[str]:
    return [s.name for s in SPECS if s.listed or not listed_only]


def spec(name: str) -> SamplerSpec:
    s = _BY_NAME.get((name or "").strip().lower())
    if s is None:
        raise EntropixError(f"unknown sampler {name!r} (known: {', '.join(names())})")
    return s


def default_name(temperature: float | None, filters: bool, openai: bool = False) -> str:
    """The sampler when none is named: greedy, or sampling when a temperature above 0 (or a
    filter) is given; OpenAI's API samples at T=1 unless told temperature 0."""
    if temperature == 0:
        return "greedy"
    return "sample" if temperature is not None or filters or openai else "greedy"


def parameters(name: str, strict: bool = False, **given: Any) -> dict[str, Any]:
    """Defaults overridden by the given (non-None) values, checked. With strict, a value
    the sampler does not take is an error; otherwise it is ignored."""
    s = spec(name)
    params = dict(s.defaults)
    for key, value in given.items():
        if value is None or (value is False and key == "aggregate"):
            continue
        if key not in s.options:
            if strict:
                raise EntropixError(f"{OPTION_FLAGS.get(key, key)} does not apply to sampler {s.name!r}")
            continue
        params[key] = value
    check_params(*(params.get(k) for k in FILTERS))
    for key in ("samples", "branches"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int)
                              or not 1 <= params[key] <= MAX_ROWS_PER_PROMPT):
            raise EntropixError(f"{OPTION_FLAGS[key]} must be between 1 and {MAX_ROWS_PER_PROMPT}, got {params[key]}")
    cfg = params.get("sampler_config")
    if isinstance(cfg, (str, Path)) and not Path(cfg).is_file():
        raise EntropixError(f"sampler config file not found: {cfg}")
    return params


def build(name: str, params: Mapping[str, Any] | None = None, model: Any = None) -> Decoder:
    """The Decoder for a sampler name; params from `parameters` (its defaults when None)."""
    s = spec(name)
    params = parameters(s.name) if params is None else dict(params)
    branching = BranchingConfig() if s.strategy == "branching" else None
    policy = s.policy(params, model)
    if s.strategy == "single" and isinstance(policy, Greedy):
        s = _BY_NAME["greedy"]  # sampling at temperature 0 is the argmax, and says so
    return Decoder(s, params, policy, branching)


def resolve(name: str, model: Any = None, strict: bool = False, **given: Any) -> Decoder:
    return build(name, parameters(name, strict, **given), model)


def default_thresholds(model: Any) -> dict[str, float]:
    """The thresholds of the model's default entropix profile (the playground's lines)."""
    return config_thresholds(entropix_config(parameters("entropix"), model))


def default_capture_layers(model: Any) -> tuple[int, ...]:
    """The attention layers the model's default entropix profile reads (one engine serves every request)."""
    return resolve("entropix", model).capture_layers

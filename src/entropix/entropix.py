"""The entropix sampler: choose a decoding strategy per token from the model's uncertainty.

Per row and per step the logit entropy H (bits) and varentropy V (bits^2), plus the
attention metrics of the captured layers, pick one of:

  flowing   H < low_ent and V < low_vent             take the argmax
  treading  H >= high_ent and V < med_vent           uncertain but flat: insert the pause token
            (state "pause"), else sample carefully     (never twice in a row, a budget per answer)
  branch    V >= high_vent and H < med_ent            a real fork: hotter, wider top-k
  resample  V >= high_vent and H >= med_ent           in the mist: hot resampling, narrower nucleus
  adaptive  everything else                           parameters adapted from the metrics;
                                                      best of N candidates by a per-candidate score

Unlike the original (spec section 3), every decision is a tensor selection per row (no
host round-trip, no batch averaging), every temperature is bounded by `max_temperature`,
and the pause token is looked up by its text in the model's own tokenizer.

Thresholds are per model: `load_profile` picks a built-in profile (src/entropix/profiles)
and `entropix calibrate` derives one from quantiles of the metrics on a shipped prompt set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import EntropixError
from .metrics import LN2
from .sampling import SAMPLERS, draw, filter_logits

log = logging.getLogger("entropix")

STATES = ("flowing", "treading", "pause", "branch", "resample", "adaptive")
FLOWING, TREADING, PAUSE, BRANCH, RESAMPLE, ADAPTIVE = range(len(STATES))

LEGEND = {
    "flowing": "confident: argmax",
    "treading": "uncertain and flat: careful sampling",
    "pause": "uncertain and flat: pause token inserted",
    "branch": "a fork: hotter, wider top-k",
    "resample": "lost in the mist: hot resampling",
    "adaptive": "in between: adapted parameters, best of N",
}

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PROMPTS_PATH = Path(__file__).resolve().parent / "data" / "calibration_prompts.jsonl"

# Which quantile of the calibration metrics gives each threshold (documented in calibrate()).
CALIBRATION_QUANTILES = {
    "low_ent": ("entropy", 0.30),
    "low_vent": ("varentropy", 0.30),
    "med_ent": ("entropy", 0.70),
    "high_ent": ("entropy", 0.90),
    "high_vent": ("varentropy", 0.80),
    "med_vent": ("varentropy | entropy >= high_ent", 0.25),
}


# -- configuration ------------------------------------------------------------------------

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
    # base sampling parameters that every strategy adapts
    temperature: float = 0.666
    top_p: float = 0.90
    top_k: int = 27
    min_p: float = 0.03
    # bounds
    max_temperature: float = 2.0  # no strategy samples hotter than this
    max_top_k: int = 100  # no strategy keeps more candidates (the sampler only looks at these)
    # treading
    pause_text: str = " ..."  # looked up with tokenizer.find_token (the closest single token)
    pause_budget: int = 2  # pause tokens per answer at most; 0 disables them
    # adaptive best-of-N
    n_candidates: int = 5
    typicality_weight: float = 0.5  # score = log q(c) - w * |surprisal(c) - H|  (nats, bits)
    # attention layers whose metrics feed the strategies (negative counts from the end)
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
        if not isinstance(data, dict):
            raise EntropixError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if not str(k).startswith("_")}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise EntropixError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**fields)
        except EntropixError as e:
            raise EntropixError(f"{source}: {str(e).removeprefix('sampler config: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "SamplerConfig":
        p = Path(path)
        if not p.is_file():
            raise EntropixError(f"sampler config {p} does not exist" if not p.exists() else f"sampler config {p} is not a file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise EntropixError(f"sampler config {p} is not a UTF-8 text file") from None
        except json.JSONDecodeError as e:
            raise EntropixError(f"sampler config {p} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(data, source=f"sampler config {p}")

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


# -- the sampler --------------------------------------------------------------------------

class EntropixSampler:
    """Entropy/varentropy-driven strategy choice, per row, on the device.

    Call with (logits [B, V], metrics {name: [B]}, rows) -> (tokens [B], codes [B]).
    The host only reads `rows[i].tokens` (already on the host) for the pause rule.
    """

    states = STATES
    needs_attention = True

    def __init__(self, config: SamplerConfig | None = None, pause_id: int = -1) -> None:
        self.config = config or SamplerConfig()
        self.pause_id = int(pause_id)
        self.capture_layers = tuple(self.config.attention_layers)

    def state_of(self, code: int | None) -> str:
        return STATES[code] if code is not None and 0 <= code < len(STATES) else "adaptive"

    # -- host-side pause bookkeeping (no device reads) ----------------------------------
    def _pause_flags(self, rows: Sequence[Any]) -> list[tuple[bool, bool]]:
        """(previous token is the pause token, a pause may be inserted now) per row."""
        pid, budget = self.pause_id, self.config.pause_budget
        out = []
        for r in rows:
            toks, mem = r.tokens, r.memory
            seen = mem.get("entropix_seen", 0)
            if seen > len(toks):  # tokens were rewritten: count afresh
                seen, mem["entropix_pauses"] = 0, 0
            if len(toks) > seen:
                mem["entropix_pauses"] = mem.get("entropix_pauses", 0) + toks[seen:].count(pid)
                mem["entropix_seen"] = len(toks)
            prev = bool(toks) and toks[-1] == pid
            out.append((prev, not prev and mem.get("entropix_pauses", 0) < budget))
        return out

    # -- strategy and parameters ----------------------------------------------------------
    # Each strategy's parameters are affine in the features f = [1, H, V, attn_entropy,
    # attn_entropy_var, agreement, interaction], then clamped: one [B, 7] x [7, 20] product
    # gives all of them, and each row gathers its own strategy's column. That keeps the
    # per-token cost to a few tensor ops, whatever the batch (a launch-bound GPU step feels
    # every extra op).
    _COLS = ("treading", "branch", "resample", "adaptive", "flowing")  # parameter columns per strategy
    _CODE_TO_COL = (4, 0, 0, 1, 2, 3)  # by state code: flowing, treading, pause, branch, resample, adaptive

    def _table(self) -> tuple[torch.Tensor, ...]:
        """Weights [7, 20], lower and upper bounds [20], integer columns [20] with their rounding
        offsets [20], and the code -> column map [6].

        Column p * 5 + s holds parameter p (temperature, top_k, top_p, min_p) of strategy s (_COLS).
        """
        c = self.config
        T0, k0, p0, m0, Tmax = c.temperature, float(c.top_k), c.top_p, c.min_p, c.max_temperature
        he, hv = max(c.high_ent, 1e-6), max(c.high_vent, 1e-6)
        # feature order: 1, H, V, attn_entropy, attn_entropy_var, agreement, interaction
        rows = {
            # temperature
            ("T", "treading"): [1.3 * T0, 0, 0, 0.2 * T0, 0, 0, 0],  # v2: T0 (1.3 + 0.2 attn_ent), <= 1.5
            ("T", "branch"): [1.2 * T0, 0, 0, 0, 0, 0, 0.3 * T0],  # v2: T0 (1.2 + 0.3 interaction), <= 1.5
            ("T", "resample"): [2.0 * T0, 0, 0, 0, 0.5 * T0, 0, 0],  # v2: T0 (2 + 0.5 attn_var), now bounded
            # T0 (1 + 0.6 u + 0.2 attn_var - 0.2 agreement), u = (H / high_ent + V / high_vent) / 2: the
            # uncertainty relative to this model's own high levels, not raw bits (v2's 0.3 (H + V) in bits
            # only made sense for one model)
            ("T", "adaptive"): [T0, 0.3 * T0 / he, 0.3 * T0 / hv, 0, 0.2 * T0, -0.2 * T0, 0],
            ("T", "flowing"): [T0, 0, 0, 0, 0, 0, 0],
            # top_k
            ("K", "treading"): [k0, 0, 0, 0, 0, 0, 0],
            ("K", "branch"): [1.5 * k0, 0, 0, 0, 0, -0.5 * k0, 0],  # k0 (1 + 0.5 (1 - agreement)), >= 5
            ("K", "resample"): [k0, 0, 0, 0, 0, 0, 0],
            ("K", "adaptive"): [k0, 0, 0, 0, 0, -0.2 * k0, 0.3 * k0],  # k0 (1 + 0.3 interaction - 0.2 agreement)
            ("K", "flowing"): [1.0, 0, 0, 0, 0, 0, 0],  # top-1: the draw is the argmax
            # top_p
            ("P", "treading"): [p0, 0, 0, 0, 0, 0, 0],
            ("P", "branch"): [p0, 0, 0, 0, 0, 0, 0],
            ("P", "resample"): [p0, 0, 0, -0.2, 0, 0, 0],  # p0 - 0.2 attn_ent, >= 0.5
            ("P", "adaptive"): [p0, 0, 0, 0, 0.1 * p0, 0, 0],  # p0 (1 + 0.1 attn_var)
            ("P", "flowing"): [1.0, 0, 0, 0, 0, 0, 0],
            # min_p
            ("M", "treading"): [m0, 0, 0, 0, 0, 0, 0],
            ("M", "branch"): [m0, 0, 0, 0, 0, 0, 0],
            ("M", "resample"): [m0, 0, 0, 0, 0, 0, 0],
            ("M", "adaptive"): [m0, -0.25 * m0 / he, -0.25 * m0 / hv, 0, 0, 0, 0],  # m0 (1 - 0.5 u)
            ("M", "flowing"): [0.0, 0, 0, 0, 0, 0, 0],
        }
        t_cap = min(1.5, Tmax)
        bounds = {
            "T": {"treading": (1e-2, t_cap), "branch": (1e-2, t_cap)},
            "K": {"branch": (min(5.0, c.max_top_k), c.max_top_k)},
            "P": {"resample": (0.5, 1.0), "adaptive": (0.1, 1.0)},
            "M": {"adaptive": (min(0.01, m0), 0.5)},
        }
        default = {"T": (1e-2, Tmax), "K": (1.0, float(c.max_top_k)), "P": (1e-3, 1.0), "M": (0.0, 1.0)}
        W, lo, hi, off = [], [], [], []
        for param in "TKPM":
            for strat in self._COLS:
                W.append(rows[(param, strat)])
                a, b = bounds[param].get(strat, default[param])
                lo.append(a)
                hi.append(b)
                # top_k: floor for branch (v2's int()), round for adaptive; 1e-4 absorbs float error
                off.append(0.5 + 1e-4 if (param, strat) == ("K", "adaptive") else 1e-4)
        is_int = torch.tensor([p == "K" for p in "TKPM" for _ in self._COLS])
        return (torch.tensor(W, dtype=torch.float32).T.contiguous(), torch.tensor(lo), torch.tensor(hi),
                is_int, torch.tensor(off), torch.tensor(self._CODE_TO_COL))

    def _tables_on(self, device: torch.device):
        if getattr(self, "_tables_dev", None) != device:
            self._tables = tuple(t.to(device) for t in self._table())
            self._tables_dev = device
        return self._tables

    def plan(self, metrics: dict[str, torch.Tensor], pause_ok: torch.Tensor | None = None):
        """Per-row state codes and sampling parameters (temperature, top_k, top_p, min_p).

        Flowing rows get top_k 1, so that sampling them is the argmax.
        """
        c = self.config
        H = metrics["entropy"].float()
        V = metrics["varentropy"].float()
        zero = torch.zeros_like(H)
        feats = torch.stack([torch.ones_like(H), H, V] + [metrics.get(k, zero).float() for k in
                            ("attn_entropy", "attn_entropy_var", "agreement", "interaction")], 1)  # [B, 7]
        W, lo, hi, is_int, off, code_to_col = self._tables_on(H.device)

        flowing = (H < c.low_ent) & (V < c.low_vent)
        treading = (H >= c.high_ent) & (V < c.med_vent)
        fork = V >= c.high_vent
        # priority: flowing, treading (pause when allowed), branch / resample, adaptive
        code = torch.where(fork, BRANCH + (H >= c.med_ent).long(), torch.full_like(H, ADAPTIVE, dtype=torch.long))
        tread_code = TREADING if pause_ok is None else TREADING + pause_ok.long()  # TREADING + 1 == PAUSE
        code = torch.where(treading, tread_code, code).masked_fill(flowing, FLOWING)

        raw = feats @ W  # [B, 20]
        raw = torch.where(is_int, (raw + off).floor(), raw)
        raw = torch.clamp(raw, lo, hi)
        col = code_to_col[code]  # [B]
        params = raw.view(-1, 4, len(self._COLS)).gather(2, col.view(-1, 1, 1).expand(-1, 4, 1))[..., 0]
        return code, params[:, 0], params[:, 1].long(), params[:, 2], params[:, 3]

    def score(self, logq: torch.Tensor, model_logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """Best-of-N score of candidates [B, N]: their log-probability under the adapted
        distribution minus a typicality penalty, |surprisal in bits - entropy|, which differs
        per candidate (the original added one constant to all, defect 4)."""
        surprisal = -model_logp / LN2
        return logq - self.config.typicality_weight * (surprisal - entropy[:, None]).abs()

    # -- the call -------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, metrics: dict[str, torch.Tensor], rows: Sequence[Any]):
        B, Vocab = logits.shape
        dev = logits.device
        c = self.config
        prev_pause = pause_ok = None
        any_prev = any_ok = False
        if 0 <= self.pause_id < Vocab:
            host = self._pause_flags(rows)
            any_prev, any_ok = any(f[0] for f in host), any(f[1] for f in host)
            if any_prev or any_ok:  # known on the host: skip the pause ops when no row needs them
                flags = torch.tensor(host, dtype=torch.bool).to(dev, non_blocking=True)  # host -> device, no wait
                prev_pause, pause_ok = flags[:, 0], flags[:, 1]
        code, temp, top_k, top_p, min_p = self.plan(metrics, pause_ok if any_ok else None)

        # Every strategy keeps at most max_top_k tokens, so the K most likely are all we sort.
        logits = logits.float()
        vals, idx = logits.topk(min(c.max_top_k, Vocab), dim=-1)
        if any_prev:  # never the pause token twice in a row, whichever strategy
            vals = vals.masked_fill(prev_pause[:, None] & (idx == self.pause_id), float("-inf"))
        logq = filter_logits(vals, temp, top_k, top_p, min_p)  # [B, K]; flowing rows keep only their argmax

        N = c.n_candidates
        gens = [r.generator for r in rows for _ in range(N)]  # each row draws from its own stream only
        cand = draw(logq.repeat_interleave(N, 0) if N > 1 else logq, gens).view(B, N)  # positions in [0, K)
        pick = cand[:, 0]
        if N > 1:
            logz = metrics.get("logz")  # the engine's logit_metrics gives it; else one more vocab pass
            logz = torch.logsumexp(logits, -1) if logz is None else logz.float()
            model_logp = vals.gather(1, cand) - logz[:, None]
            best = self.score(logq.gather(1, cand), model_logp, metrics["entropy"].float()).argmax(-1, keepdim=True)
            pick = torch.where(code == ADAPTIVE, cand.gather(1, best)[:, 0], pick)
        tokens = idx.gather(1, pick[:, None])[:, 0]
        if any_ok:
            tokens = tokens.masked_fill(code == PAUSE, self.pause_id)
        return tokens, code

    # -- reporting ------------------------------------------------------------------------
    def summary(self, records: Iterable[Any], colour: bool = False) -> str:
        """A legend of the strategies and how often each chose a token."""
        return strategy_summary(records, colour)


def strategy_summary(records: Iterable[Any], colour: bool = False) -> str:
    from .cli import RESET, STATE_COLOURS

    def paint(s: str) -> str:
        c = STATE_COLOURS.get(s, "") if colour else ""
        return f"{c}{s}{RESET}" if c else s

    counts: dict[str, int] = {}
    for r in records:
        st = r.get("state") if isinstance(r, dict) else getattr(r, "state", None)
        counts[st or "?"] = counts.get(st or "?", 0) + 1
    total = sum(counts.values())
    legend = "legend: " + " | ".join(f"{paint(s)} = {LEGEND[s]}" for s in STATES)
    order = [s for s in STATES if s in counts] + sorted(s for s in counts if s not in STATES)
    fired = ", ".join(f"{paint(s)} {counts[s]} ({100 * counts[s] / total:.0f}%)" for s in order) if total else "none"
    return f"{legend}\nstrategies: {fired}"


def make_entropix(lm=None, sampler_config=None, temperature=None, **kw) -> EntropixSampler:
    """Factory behind make_sampler('entropix'): sampler_config is a SamplerConfig, a dict or
    a JSON profile path; without one, the built-in profile for lm.name. A temperature, top_k,
    top_p or min_p given here replaces the profile's base value. Other keywords are ignored."""
    if isinstance(sampler_config, SamplerConfig):
        cfg = sampler_config
    elif isinstance(sampler_config, dict):
        cfg = SamplerConfig.from_dict(sampler_config)
    elif sampler_config is not None:
        cfg = SamplerConfig.from_json(sampler_config)
    else:
        cfg = load_profile(getattr(lm, "name", None))
    over = {"temperature": temperature, **{k: kw.get(k) for k in ("top_k", "top_p", "min_p")}}
    over = {k: v for k, v in over.items() if v is not None}
    if over:
        if over.get("temperature", 1) == 0:
            raise EntropixError("the entropix sampler needs a base temperature above 0 (use --sampler greedy for argmax)")
        if over.get("top_k", 1) == 0:
            over["top_k"] = cfg.max_top_k  # 0 means "off" elsewhere: here, the widest allowed
        if over.get("top_k", 1) > cfg.max_top_k:
            over["max_top_k"] = over["top_k"]
        if over.get("temperature", 0) > cfg.max_temperature:
            over["max_temperature"] = over["temperature"]
        cfg = dataclasses.replace(cfg, **over)
    pause_id = lm.tokenizer.find_token(cfg.pause_text) if lm is not None else -1
    return EntropixSampler(cfg, pause_id)


SAMPLERS["entropix"] = make_entropix


# -- calibration --------------------------------------------------------------------------

class _GreedyProbe:
    """Argmax with attention captured: the calibration run's sampler."""

    needs_attention = True
    states = ("greedy",)

    def __call__(self, logits, metrics, rows):
        return logits.argmax(-1), None

    def state_of(self, code):
        return "greedy"


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a JSON-lines file ({"prompt": ...} per line) or a plain text file (one per line)."""
    p = Path(path) if path is not None else PROMPTS_PATH
    if not p.is_file():
        raise EntropixError(f"prompt file {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EntropixError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise EntropixError(f"{p}:{n}: expected an object with a string 'prompt'")
            line = obj["prompt"]
        out.append(line)
    if not out:
        raise EntropixError(f"prompt file {p} holds no prompts")
    return out


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else 0.0


def thresholds_from_metrics(H: torch.Tensor, V: torch.Tensor) -> dict[str, float]:
    """Thresholds from quantiles of per-token entropy H and varentropy V:

    low_ent  = 30th percentile of H    low_vent  = 30th percentile of V   (flowing box)
    med_ent  = 70th percentile of H    (branch below, resample above, among high-V tokens)
    high_ent = 90th percentile of H    high_vent = 80th percentile of V
    med_vent = 25th percentile of V among the tokens with H >= high_ent (the flattest quarter of
               the most uncertain tokens treads carefully; H and V are strongly correlated, so a
               marginal quantile would make treading unreachable)
    """
    t = {name: _quantile(H if metric == "entropy" else V, q)
         for name, (metric, q) in CALIBRATION_QUANTILES.items() if name != "med_vent"}
    hi = V[H >= t["high_ent"]]
    mv = _quantile(hi, CALIBRATION_QUANTILES["med_vent"][1]) if hi.numel() else t["low_vent"]
    t["med_vent"] = max(mv, t["low_vent"])
    t["med_ent"] = min(max(t["med_ent"], t["low_ent"]), t["high_ent"])
    return {k: round(v, 4) for k, v in t.items()}


@torch.inference_mode()
def collect_metrics(lm, prompts: Sequence[str], max_tokens: int = 64, batch_size: int = 64,
                    layers: tuple[int, ...] = (-1,), progress: bool = False) -> dict[str, torch.Tensor]:
    """Greedy-decode every prompt (chat template, batched) and return per-token metrics [N]."""
    from .generate import Engine, Request

    if max_tokens < 1:
        raise EntropixError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise EntropixError(f"--batch-size must be at least 1, got {batch_size}")
    probe = _GreedyProbe()
    cols: dict[str, list[float]] = {}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        eng = Engine(lm, capture_layers=layers)
        eng.add([Request(lm.tokenizer.encode_chat([{"role": "user", "content": p}]), probe, max_tokens=max_tokens,
                         stop_ids=lm.tokenizer.stop_ids, top_logprobs=1) for p in chunk])
        while eng.active:
            for r in eng.step():
                cols.setdefault("entropy", []).append(r.entropy)
                cols.setdefault("varentropy", []).append(r.varentropy)
                for k, v in (r.attn or {}).items():
                    cols.setdefault(k, []).append(v)
        if progress:
            print(f"calibrate: {min(start + batch_size, len(prompts))}/{len(prompts)} prompts, "
                  f"{len(cols.get('entropy', []))} tokens", file=sys.stderr, flush=True)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}


def calibrate(lm, prompts: Sequence[str] | None = None, max_tokens: int = 64, batch_size: int = 64,
              base: SamplerConfig | None = None, progress: bool = False) -> tuple[SamplerConfig, dict[str, Any]]:
    """A profile for lm: base settings with thresholds from this model's own metrics."""
    prompts = list(prompts) if prompts is not None else load_prompts()
    base = base or SamplerConfig()
    m = collect_metrics(lm, prompts, max_tokens, batch_size, base.attention_layers, progress)
    H, V = m["entropy"], m["varentropy"]
    if H.numel() < 20:
        raise EntropixError(f"calibration produced only {H.numel()} tokens; give more prompts or --max-tokens")
    cfg = dataclasses.replace(base, model=lm.name, **thresholds_from_metrics(H, V))
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    code, *_ = EntropixSampler(cfg).plan({k: v.float() for k, v in m.items()})
    stats = {
        "prompts": len(prompts), "tokens": int(H.numel()), "max_tokens": max_tokens, "decoding": "greedy, chat template",
        "quantiles": {name: f"{metric} q{q:g}" for name, (metric, q) in CALIBRATION_QUANTILES.items()},
        "metric_quantiles": {k: {f"q{q:g}": round(_quantile(v, q), 4) for q in qs} for k, v in m.items()},
        "state_shares": {s: round(float((code == i).double().mean()), 4) for i, s in enumerate(STATES) if s != "pause"},
    }
    return cfg, stats


def cmd_calibrate(args) -> int:
    from .cli import eprint, load

    base = SamplerConfig.from_json(args.base) if args.base else SamplerConfig()
    prompts = load_prompts(args.prompts)  # bad input fails before the model loads
    lm = load(args)
    eprint(f"calibrating {lm.name} on {len(prompts)} prompts, up to {args.max_tokens} greedy tokens each ...")
    cfg, stats = calibrate(lm, prompts, args.max_tokens, args.batch_size, base, progress=True)
    text = cfg.to_json(extra={"_calibration": stats})
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        eprint(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    th = ", ".join(f"{k} {getattr(cfg, k):g}" for k in CALIBRATION_QUANTILES)
    eprint(f"{stats['tokens']} tokens; thresholds: {th}")
    eprint("shares on the calibration tokens: " + ", ".join(f"{k} {v:.0%}" for k, v in stats["state_shares"].items()))
    return 0


def register_cli(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("calibrate", help="derive entropix thresholds for a model from its own metrics")
    add_model_args(p)
    p.add_argument("--out", "-o", default=None, help="write the profile here (default: print it)")
    p.add_argument("--max-tokens", "-n", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--prompts", default=None, help="JSON-lines ({\"prompt\": ...}) or text file (default: the shipped set)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts decoded together")
    p.add_argument("--base", default=None, help="profile whose non-threshold settings the new one keeps")
    p.set_defaults(fn=cmd_calibrate)

"""DSlider (entropix "v5"), with the original's bugs fixed: config, policy and a numpy reference.

Per row, the sampler keeps running averages (EMA) of the entropy and varentropy of the
model's distribution ("naked") and of the distribution it actually samples from
("scaffold"), of the chosen tokens' surprisal and its deviation, and a Dirichlet over the
top-K of the distribution (its parameters alpha and the EMA m of the log-probabilities it
was fitted to). Each step it decides, per row:

  argmax     not an outlier and the top-k entropy is low         take the most likely token
  inlier     not an outlier otherwise                            sample the top-k at a temperature
                                                                 that hits the running top-k entropy
  dirichlet  outlier, the distribution is likely under the       argmax of a Dirichlet draw mixed
             row's Dirichlet                                     with the (tempered) distribution
  ood        outlier, unlikely under it                          sample from the Dirichlet draw

Everything runs on the support = the K most likely tokens of the step (ranks, not token
ids: the Dirichlet describes the shape of the top of the distribution). Entropies in
nats. `docs/../shared/docs/dslider-spec.md` has the algorithm; the fixes against the
original: the naked log-probability is y[tok] (not the log of it), the deviation is
(tce + lp)^2, the Dirichlet log-density has the right sign, the target entropy is per
row and clamped below ln K, H'' is the true second derivative, every draw has its own
uniform, KL_pi is clamped at 0 and the state advances in every row.

Random draws come from the host (uniforms): Dirichlet draws are normalised Gamma draws,
each made by Marsaglia-Tsang with a fixed number of attempts from uniforms (inverse
normal CDF) and the shape boost Gamma(a) = Gamma(a + 1) U^(1/a).

This module is framework-free; `backends/torch/dslider.py` is the batched device code
and the functions below are its reference in numpy (float64, one row).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from .. import EntropixError
from .config import config_fields, read_json_object
from .policy import TokenPolicy

EPS = 1e-8
LN_EPS = math.log(EPS)
DSLIDER_REGIMES = ("argmax", "inlier", "dirichlet", "ood")
DSLIDER_STATES = DSLIDER_REGIMES  # the older name; tests import it
ARGMAX, INLIER, DIRICHLET, OOD = range(4)
GAMMA_ATTEMPTS = 2  # Marsaglia-Tsang accepts >= 95% per attempt; a row that fails both keeps its last proposal
UNIFORMS_PER_GAMMA = 2 * GAMMA_ATTEMPTS + 1
# Per-row state: (name, per support position?). Original names in the spec.
STATE_FIELDS = (("alpha", True), ("m", True), ("temp", False), ("ent_n", False), ("varent_n", False),
                ("ent_s", False), ("varent_s", False), ("tce_n", False), ("tce_s", False), ("tcv_n", False),
                ("tcv_s", False), ("dir_ent", False), ("topk_ent", False))
# Quantities each record carries (the backend's extra columns).
EXTRA_KEYS = ("dslider_score", "dslider_temp", "dslider_inlier_temp", "dslider_topk_entropy", "dslider_nll",
              "dslider_rho", "dslider_topk_ent_avg", "dslider_nll_avg")  # the last two: the running averages
#               the argmax and Dirichlet tests compared with (what `entropix calibrate --sampler dslider` reads)
T_MIN, T_MAX = 2.0 ** -10, 1.5 ** 10  # TempSolve's reach from T = 1 in 10 halving/1.5x steps
ALPHA_MIN, ALPHA_MAX = 1e-6, 1e8  # keeps fp32 finite; the MLE of one distribution is at infinity


@dataclass(frozen=True)
class DSliderConfig:
    """DSlider's parameters with the original's defaults (main, 0a7f7bb), but a top-K support."""

    emwa_ent_naked_coeff: float = 0.7
    emwa_varent_naked_coeff: float = 0.7
    emwa_ent_scaffold_coeff: float = 0.7
    emwa_varent_scaffold_coeff: float = 0.7
    emwa_topk_ent_naked_coeff: float = 0.7
    emwa_temp_coeff: float = 0.7
    emwa_dir_ent_coeff: float = 0.7
    token_cross_ent_naked_coeff: float = 0.65
    token_cross_ent_scaffold_coeff: float = 0.65
    token_cross_var_naked_coeff: float = 0.65
    token_cross_var_scaffold_coeff: float = 0.75
    emwa_logp_base: float = 4.0
    emwa_logp_exp_factor: float = 3.0
    perturb_base_coeff: float = 10.0
    perturb_exp_coeff: float = 1.0
    support: int = 64  # K most likely tokens (the original: the whole Llama-3 vocabulary)
    noise_floor: float = -12.0
    outlier_bilinear: tuple[tuple[float, ...], ...] = ((1.3,) * 4,) * 4  # W over a = [tceS, tceN, entS, entN]
    linear_state_ent: tuple[float, ...] = (0.8,) * 4
    linear_state_std: tuple[float, ...] = (0.8,) * 4
    linear_naked_ent: float = 1.2
    linear_naked_varent: float = 1.2
    outlier_bias: float = 0.0
    argmax_threshold: tuple[float, float] = (0.1, 1.2)  # (weight, bias) on the running top-k entropy
    dirichlet_threshold: tuple[float, float] = (0.1, 1.2)  # (weight, bias) on the running Dirichlet NLL
    target_entropy: tuple[float, ...] = (1.0,) * 4  # lambda over a
    target_entropy_temp: float = 8.0  # lambda_T / running temperature
    target_entropy_bias: float = 0.0
    outlier_topk: int = 6
    fit_iters: int = 140  # Dirichlet MLE iterations (fixed: no device sync)
    temp_iters: int = 10  # temperature-solve iterations
    wild: bool = True  # draw from the Dirichlet (False: use its mean)
    # Not in the original: per step, refit alpha to the moved m by this many plain Newton steps from
    # the row's previous alpha (the same root; m moves by a share gamma of q - m per step). 0 refits
    # from alpha = 1 with fit_iters damped steps every step, as the original did (slow: ~30 ops each).
    refit_iters: int = 3
    # Not in the original, whose init fitted alpha to the mean over the prompt's positions: from one
    # distribution p0 that fit has no finite answer (alpha grows without bound, and where it stops
    # is rounding noise). Here alpha0 = init_concentration * p0 and m0 = E[ln pi] under Dir(alpha0),
    # so alpha0 is exactly FitDir(m0).
    init_concentration: float = 100.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):  # from JSON
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                object.__setattr__(self, f.name, v)
            if f.name == "wild":
                if not isinstance(v, bool):
                    raise EntropixError(f"dslider config: wild must be true or false, got {v!r}")
                continue
            flat = [x for row in v for x in (row if isinstance(row, tuple) else (row,))] if isinstance(v, tuple) else [v]
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in flat):
                raise EntropixError(f"dslider config: {f.name} must hold finite numbers, got {v!r}")
        shapes = {"outlier_bilinear": (4, 4), "linear_state_ent": (4,), "linear_state_std": (4,),
                  "argmax_threshold": (2,), "dirichlet_threshold": (2,), "target_entropy": (4,)}
        for name, shape in shapes.items():
            if np.asarray(getattr(self, name), dtype=float).shape != shape:
                raise EntropixError(f"dslider config: {name} must have shape {shape}")
        for name, lo, hi in (("support", 2, 100_000), ("outlier_topk", 2, 100_000), ("fit_iters", 1, 10_000),
                             ("temp_iters", 1, 1000), ("refit_iters", 0, 10_000)):
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise EntropixError(f"dslider config: {name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.outlier_topk > self.support:
            raise EntropixError(f"dslider config: outlier_topk ({self.outlier_topk}) must not exceed support ({self.support})")
        for f in dataclasses.fields(self):
            if f.name.endswith("_coeff") and f.name.startswith(("emwa", "token")) and not 0 <= getattr(self, f.name) <= 1:
                raise EntropixError(f"dslider config: {f.name} must be in [0, 1], got {getattr(self, f.name)}")
        if not 1e-3 <= self.init_concentration <= 1e6:
            raise EntropixError(f"dslider config: init_concentration must be in [0.001, 1e6], got {self.init_concentration}")
        if self.emwa_logp_base <= 1 or self.perturb_base_coeff <= 1:
            raise EntropixError("dslider config: emwa_logp_base and perturb_base_coeff must be above 1")

    @classmethod
    def from_dict(cls, data: Any, source: str = "dslider config") -> "DSliderConfig":
        fields = config_fields(cls, data, source)
        try:
            return cls(**fields)
        except (EntropixError, TypeError) as e:
            raise EntropixError(f"{source}: {str(e).removeprefix('dslider config: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "DSliderConfig":
        return cls.from_dict(read_json_object(path), source=f"sampler config {path}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles" / "dslider"


def load_dslider_profile(model_name: str | None) -> DSliderConfig:
    """The built-in DSlider profile (`entropix calibrate --sampler dslider`) whose name occurs in the
    model's name, matched as the entropix profiles are; else the spec's defaults."""
    from .config import _norm

    base = _norm(re.split(r"[\\/]", (model_name or "").rstrip("/\\"))[-1])
    hits = [(len(_norm(p.stem)), p) for p in sorted(PROFILE_DIR.glob("*.json")) if base and _norm(p.stem) in base]
    return DSliderConfig.from_json(max(hits)[1]) if hits else DSliderConfig()


@dataclass(frozen=True)
class DSlider(TokenPolicy):
    """The DSlider policy; its per-row state lives in the backend and forks with the row."""

    config: DSliderConfig = DSliderConfig()
    regimes: ClassVar[tuple[str, ...]] = DSLIDER_REGIMES
    backends: ClassVar[tuple[str, ...]] = ("torch",)

    @property
    def draws(self) -> int:
        """Two categorical draws, then UNIFORMS_PER_GAMMA per support position."""
        return 2 + UNIFORMS_PER_GAMMA * self.config.support


# -- the numpy reference (one row, float64) -----------------------------------------------------

def normalize(x: np.ndarray, floor: float = -12.0) -> np.ndarray:
    """N(x): log-softmax, with everything below the floor set to ln(eps) (not renormalised)."""
    z = np.asarray(x, dtype=np.float64) - np.max(x)
    y = z - np.log(np.sum(np.exp(z)))
    return np.where(y < floor, LN_EPS, y)


def ent(y: np.ndarray) -> tuple[float, float]:
    """(entropy, varentropy) in nats of log-probabilities y."""
    p = np.exp(y)
    h = -np.sum(p * y)
    return float(h), float(np.sum(p * (y + h) ** 2))


def ema(c: float, new, old):
    return c * new + (1 - c) * old


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.lgamma, otypes=[float])(x)


def polygamma(n: int, x: np.ndarray) -> np.ndarray:
    """psi^(n)(x) for n = 0, 1, 2 and x > 0: recurrence up to x >= 8, then the asymptotic series."""
    x = np.asarray(x, dtype=np.float64).copy()
    acc = np.zeros_like(x)
    while np.any(x < 8):
        lo = x < 8
        acc[lo] += (-1.0 / x[lo], 1.0 / x[lo] ** 2, -2.0 / x[lo] ** 3)[n]
        x[lo] += 1
    i = 1.0 / x
    i2 = i * i
    if n == 0:
        s = np.log(x) - 0.5 * i - i2 * (1 / 12 - i2 * (1 / 120 - i2 * (1 / 252 - i2 * (1 / 240 - i2 / 132))))
    elif n == 1:
        s = i + 0.5 * i2 + i * i2 * (1 / 6 - i2 * (1 / 30 - i2 * (1 / 42 - i2 * (1 / 30 - i2 * 5 / 66))))
    else:
        s = -i2 - i * i2 - i2 * i2 * (0.5 - i2 * (1 / 6 - i2 * (1 / 6 - i2 * (3 / 10 - i2 * 5 / 6))))
    return acc + s


def log_dirichlet(q: np.ndarray, alpha: np.ndarray) -> float:
    """Log-density of Dir(alpha) at p = exp(q): lnG(sum a) - sum lnG(a_i) + sum (a_i - 1) q_i."""
    a = np.asarray(alpha, dtype=np.float64)
    return float(math.lgamma(a.sum()) - _lgamma(a).sum() + np.sum((a - 1) * q))


def fit_lr(k: ArrayLike) -> np.ndarray:
    """FitDir's step size at iteration k = 1, 2, ... (a number or an array of them)."""
    x = np.asarray(k, dtype=np.float64)
    return np.maximum(1e-8, 1.2 * np.exp(-0.1 * x ** 0.75) * np.abs(np.cos(2.0 / x ** 0.25)))


def fit_dirichlet(t: np.ndarray, iters: int = 140, tol: float = 1e-4, start: np.ndarray | None = None) -> np.ndarray:
    """alpha with psi(alpha) - psi(sum alpha) = t (the Dirichlet MLE given mean log-probabilities t),
    from alpha = 1 by the spec's damped second-order Newton steps, frozen once |F| < tol; from
    `start` instead, plain Newton steps (lr 1; the spec's second-order term is not Halley's and
    slows them down near the root)."""
    t = np.asarray(t, dtype=np.float64)
    a = np.ones_like(t) if start is None else np.asarray(start, dtype=np.float64).copy()
    for k in range(1, iters + 1):
        S = a.sum()
        F = polygamma(0, a) - polygamma(0, np.array([S]))[0] - t
        if np.linalg.norm(F) < tol:
            break
        d = 1.0 / polygamma(1, a)
        t1S = polygamma(1, np.array([S]))[0]
        den = 1.0 - t1S * d.sum()
        den = math.copysign(max(abs(den), 1e-12), den)
        kappa = t1S / den

        def jinv(x):
            return d * x + kappa * np.dot(d, x) * d

        v = jinv(F)
        if start is None:
            delta = -v + 0.5 * jinv(polygamma(2, a) * v - polygamma(2, np.array([S]))[0] * v.sum())
            step = np.clip(fit_lr(k) * delta, -a / 2, a / 2)
        else:
            step = np.clip(-v, -a / 2, a / 2)
        a = np.clip(a + step, ALPHA_MIN, ALPHA_MAX)
    return a


def temp_solve(logits: np.ndarray, target: float, iters: int = 10, tol: float = 1e-6) -> tuple[float, bool]:
    """(T, reached): T with H(softmax(logits / T)) = target (nats) by Halley steps from T = 1,
    each at most half of T; reached says |H - target| < tol at the end."""
    x = np.asarray(logits, dtype=np.float64)
    T = 1.0

    def err(T):
        y = normalize(x / T, -np.inf)
        p = np.exp(y)
        h = -np.sum(p * y)
        c = y + h  # log p - E[log p]
        return h - target, np.sum(p * c * c), np.sum(p * c ** 3)

    for _ in range(iters):
        e, mu2, mu3 = err(T)
        if abs(e) < tol:
            break
        d1 = mu2 / T
        d2 = -(mu3 + 3 * mu2) / T ** 2
        D = 2 * d1 * d1 - e * d2
        if abs(d1) < 1e-8:
            s = math.copysign(0.1 * T, e)
        elif abs(D) < 1e-8:
            s = e / d1
        else:
            s = 2 * e * d1 / D
        T = T - float(np.clip(s, -T / 2, T / 2))
    return T, abs(err(T)[0]) < tol


def gamma_draw(alpha: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Gamma(alpha, 1) draws from uniforms u [K, UNIFORMS_PER_GAMMA] (Marsaglia-Tsang, boosted)."""
    a = np.asarray(alpha, dtype=np.float64)
    u = np.clip(np.asarray(u, dtype=np.float64), 2.0 ** -25, 1 - 2.0 ** -24)
    d = a + 1 - 1 / 3
    c = 1 / np.sqrt(9 * d)
    inv = np.vectorize(NormalDist().inv_cdf, otypes=[float])

    def attempt(i: int) -> tuple[np.ndarray, np.ndarray]:
        """(accepted [K], proposal [K]) of attempt i."""
        x = inv(u[:, 2 * i])
        v = np.maximum(1 + c * x, 1e-6) ** 3
        return np.log(u[:, 2 * i + 1]) < 0.5 * x * x + d - d * v + d * np.log(v), d * v

    g = attempt(GAMMA_ATTEMPTS - 1)[1]  # where no attempt is accepted, the last proposal stands
    for i in range(GAMMA_ATTEMPTS - 2, -1, -1):  # the first accepted attempt wins: fill from the last one back
        ok, proposal = attempt(i)
        g = np.where(ok, proposal, g)
    return g * u[:, -1] ** (1 / a)


def cat_draw(logp: np.ndarray, u: float) -> int:
    """Inverse-CDF draw of a position from (unnormalised) log-weights."""
    w = np.exp(np.asarray(logp, dtype=np.float64) - np.max(logp))
    cdf = np.cumsum(w)
    return int(min(np.sum(cdf <= min(u, 1 - 2.0 ** -24) * cdf[-1]), len(w) - 1))


def refit(c: DSliderConfig, alpha: np.ndarray, m_new: np.ndarray) -> np.ndarray:
    if c.refit_iters == 0:
        return fit_dirichlet(m_new, c.fit_iters)
    return fit_dirichlet(m_new, c.refit_iters, start=alpha)


def outlier_score(c: DSliderConfig, s: dict, H: float, V: float) -> float:
    a = np.array([s["tce_s"], s["tce_n"], s["ent_s"], s["ent_n"]], dtype=np.float64)
    sig = np.sqrt(np.maximum([s["tcv_s"], s["tcv_n"], s["varent_s"], s["varent_n"]], 0.0))
    W = np.asarray(c.outlier_bilinear, dtype=np.float64)
    return float(a @ W @ sig + np.dot(c.linear_state_ent, a) + np.dot(c.linear_state_std, sig)
                 + c.linear_naked_ent * H + c.linear_naked_varent * V + c.outlier_bias)


def target_entropy(c: DSliderConfig, s: dict) -> float:
    """tau = lambda . a + lambda_T / temp + beta, per row, clamped inside (0, ln K)."""
    a = np.array([s["tce_s"], s["tce_n"], s["ent_s"], s["ent_n"]], dtype=np.float64)
    tau = np.dot(c.target_entropy, a) + c.target_entropy_temp / max(s["temp"], 1e-6) + c.target_entropy_bias
    return float(np.clip(tau, 1e-3, 0.99 * math.log(c.support)))


def init_state(c: DSliderConfig, top_logp: np.ndarray, H: float, V: float) -> dict:
    """A row's state from its first distribution: top_logp = the support's model log-probabilities
    (most likely first), H and V the full distribution's entropy and varentropy (nats)."""
    y = normalize(top_logp, c.noise_floor)
    alpha = np.maximum(c.init_concentration * np.exp(y), ALPHA_MIN)
    m = polygamma(0, alpha) - polygamma(0, np.array([alpha.sum()]))[0]
    yk = top_logp[:c.outlier_topk]
    return {"alpha": alpha, "m": m, "temp": 1.0, "ent_n": H, "varent_n": V, "ent_s": H, "varent_s": 0.0,
            "tce_n": float(-np.mean(yk)), "tcv_n": float(np.var(yk)), "tce_s": H, "tcv_s": 0.0,
            "dir_ent": -log_dirichlet(m, alpha), "topk_ent": ent(normalize(yk, c.noise_floor))[0]}


def step(c: DSliderConfig, s: dict, top_logp: np.ndarray, H: float, V: float, u: np.ndarray):
    """One DSlider step for one row: (position in the support, regime code, new state, info).

    top_logp [K]: the model's log-probabilities of the support (most likely first); H, V in
    nats; u: the row's uniforms for this step (DSlider.draws of them).
    """
    lp = np.where(top_logp < c.noise_floor, LN_EPS, top_logp)  # y[support], floored
    ysup = normalize(top_logp, c.noise_floor)
    score = outlier_score(c, s, H, V)
    outlier = score > 0
    yk = normalize(top_logp[:c.outlier_topk], c.noise_floor)
    Hk = ent(yk)[0]
    is_argmax = (not outlier) and Hk < c.argmax_threshold[0] * s["topk_ent"] + c.argmax_threshold[1]
    t_in, _ = temp_solve(yk, min(max(s["topk_ent"], 1e-3), 0.99 * math.log(c.outlier_topk)), c.temp_iters)
    pos_in = cat_draw(yk / t_in, u[0])
    T, _ = temp_solve(ysup, target_entropy(c, s), c.temp_iters)
    q = normalize(ysup / np.clip(T, 1e-4, 1e4), c.noise_floor)
    kl_m = max(float(np.sum(np.exp(q) * (q - s["m"]))), 0.0)
    gamma = c.emwa_logp_base ** (-c.emwa_logp_exp_factor / (kl_m + EPS))
    m_new = gamma * q + (1 - gamma) * s["m"]
    alpha_new = refit(c, s["alpha"], m_new)
    nll = -log_dirichlet(q, s["alpha"])
    use_dir = outlier and nll < c.dirichlet_threshold[0] * s["dir_ent"] + c.dirichlet_threshold[1]
    if c.wild:
        g = gamma_draw(alpha_new, np.asarray(u[2:], dtype=np.float64).reshape(c.support, UNIFORMS_PER_GAMMA))
        pi = g / max(g.sum(), 1e-30)
    else:
        pi = alpha_new / alpha_new.sum()
    kl_pi = max(float(np.sum(pi * (np.log(pi + EPS) - q))), 0.0)
    rho = 1 - c.perturb_base_coeff ** (-c.perturb_exp_coeff / (kl_pi + EPS))
    r = rho * pi + (1 - rho) * np.exp(q)
    code = (DIRICHLET if use_dir else OOD) if outlier else (ARGMAX if is_argmax else INLIER)
    pos = {ARGMAX: 0, INLIER: pos_in, DIRICHLET: int(np.argmax(r)), OOD: cat_draw(np.log(pi + EPS), u[1])}[code]
    Hs, Vs = ent(np.log(r + EPS))
    lp_s, lp_n = math.log(r[pos] + EPS), float(lp[pos])
    n = dict(s)
    n.update(ent_n=ema(c.emwa_ent_naked_coeff, H, s["ent_n"]), varent_n=ema(c.emwa_varent_naked_coeff, V, s["varent_n"]),
             topk_ent=ema(c.emwa_topk_ent_naked_coeff, Hk, s["topk_ent"]), temp=ema(c.emwa_temp_coeff, T, s["temp"]),
             ent_s=ema(c.emwa_ent_scaffold_coeff, Hs, s["ent_s"]), varent_s=ema(c.emwa_varent_scaffold_coeff, Vs, s["varent_s"]),
             dir_ent=ema(c.emwa_dir_ent_coeff, nll, s["dir_ent"]), m=m_new, alpha=alpha_new)
    for side, lpx in (("n", lp_n), ("s", lp_s)):
        tce = ema(getattr(c, f"token_cross_ent_{'naked' if side == 'n' else 'scaffold'}_coeff"), -lpx, s[f"tce_{side}"])
        n[f"tce_{side}"] = tce
        n[f"tcv_{side}"] = ema(getattr(c, f"token_cross_var_{'naked' if side == 'n' else 'scaffold'}_coeff"),
                               (tce + lpx) ** 2, s[f"tcv_{side}"])
    info = {"score": score, "temp": T, "inlier_temp": t_in, "topk_entropy": Hk, "nll": nll, "rho": rho, "gamma": gamma,
            "topk_ent_avg": s["topk_ent"], "nll_avg": s["dir_ent"]}
    return pos, code, n, info

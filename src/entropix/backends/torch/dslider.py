"""DSlider on the device: batched, fixed-iteration PyTorch twins of `entropix.sampler.dslider`.

Every function works on a group of rows [B, ...] at once; the Dirichlet fit and the
temperature solves run a fixed number of iterations with converged rows frozen by masks,
so no step waits for the device. Per-row state lives in `DSliderStates`, which the
backend reorders, repeats and extends with its rows (a fork inherits its parent's state).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ...sampler.dslider import (ALPHA_MAX, ALPHA_MIN, ARGMAX, DIRICHLET, EPS, EXTRA_KEYS, GAMMA_ATTEMPTS, INLIER,
                                LN_EPS, OOD, STATE_FIELDS, T_MAX, T_MIN, UNIFORMS_PER_GAMMA, DSlider, DSliderConfig,
                                fit_lr)


def normalize(x: torch.Tensor, floor: float) -> torch.Tensor:
    y = torch.log_softmax(x, dim=-1)
    return y.masked_fill(y < floor, LN_EPS)


def ent(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = y.exp()
    h = -(p * y).sum(-1)
    return h, (p * (y + h[:, None]) ** 2).sum(-1)


def ema(c: float, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return c * new + (1 - c) * old


def log_dirichlet(q: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[B] log-density of Dir(alpha) at exp(q), computed in fp64 where the device has it (alpha
    reaches 1e6 and more, where fp32 lgamma has no digits left for the difference)."""
    a, q = alpha.to(_wide(alpha)), q.to(_wide(alpha))
    return (torch.lgamma(a.sum(-1)) - torch.lgamma(a).sum(-1) + ((a - 1) * q).sum(-1)).float()


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


@lru_cache(maxsize=8)
def _lrs(iters: int) -> tuple[float, ...]:
    return tuple(float(x) for x in fit_lr(np.arange(1, iters + 1)))


def fit_dirichlet(t: torch.Tensor, iters: int, tol: float = 1e-4, start: torch.Tensor | None = None) -> torch.Tensor:
    """alpha [B, K] with psi(alpha) - psi(sum alpha) = t, from alpha = 1, `iters` damped
    second-order Newton steps (Sherman-Morrison inverse of the Jacobian); rows freeze once
    |F| < tol; from `start` instead, plain Newton steps. alpha and its sum ride in one
    [B, K + 1] tensor so each polygamma is one call. In fp64 where the device has it:
    psi(alpha) - psi(sum) is a difference of nearly equal numbers once alpha is large (the fit
    of a single distribution grows without bound), and fp32 makes it noise."""
    t = t.to(_wide(t))
    B, K = t.shape
    a = torch.ones_like(t) if start is None else start.to(t.dtype)
    lrs = _lrs(iters) if start is None else None
    for k in range(iters):
        x = torch.cat([a, a.sum(-1, keepdim=True)], -1)
        p0, p1 = torch.special.digamma(x), torch.polygamma(1, x)
        F = p0[:, :K] - p0[:, K:] - t
        live = (F.norm(dim=-1, keepdim=True) >= tol)
        d = 1.0 / p1[:, :K]
        t1S = p1[:, K:]
        den = 1.0 - t1S * d.sum(-1, keepdim=True)
        den = torch.where(den >= 0, den.clamp_min(1e-12), den.clamp_max(-1e-12))
        kappa = t1S / den
        v = d * F + kappa * (d * F).sum(-1, keepdim=True) * d
        if lrs is None:
            delta = -v
        else:
            p2 = torch.polygamma(2, x)
            w = p2[:, :K] * v - p2[:, K:] * v.sum(-1, keepdim=True)
            delta = lrs[k] * (0.5 * (d * w + kappa * (d * w).sum(-1, keepdim=True) * d) - v)
        half = 0.5 * a
        step = torch.maximum(torch.minimum(delta, half), -half)
        a = torch.where(live, (a + step).clamp(ALPHA_MIN, ALPHA_MAX), a)
    return a.float()


def temp_solve(x: torch.Tensor, target: torch.Tensor, iters: int, tol: float = 1e-6) -> torch.Tensor:
    """T [B] with H(softmax(x / T)) = target [B] (nats): Halley steps from T = 1, each at
    most half of T (so T stays in [2^-iters, 1.5^iters]); rows freeze once |error| < tol."""
    x = x.float()
    T = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    for _ in range(iters):
        y = torch.log_softmax(x / T[:, None], dim=-1)
        p = y.exp()
        h = -(p * y).sum(-1)
        c = y + h[:, None]
        mu2 = (p * c * c).sum(-1)
        mu3 = (p * c * c * c).sum(-1)
        e = h - target
        d1 = mu2 / T
        d2 = -(mu3 + 3 * mu2) / (T * T)
        D = 2 * d1 * d1 - e * d2
        s = torch.where(D.abs() < 1e-8, e / d1.clamp_min(1e-8), 2 * e * d1 / torch.where(D.abs() < 1e-8, 1.0, D))
        s = torch.where(d1.abs() < 1e-8, torch.where(e >= 0, 0.1, -0.1) * T, s)
        s = torch.maximum(torch.minimum(s, 0.5 * T), -0.5 * T)
        T = torch.where(e.abs() < tol, T, T - s)
    return T.clamp(T_MIN, T_MAX)


def gamma_draw(alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gamma(alpha, 1) [B, K] from uniforms u [B, K, UNIFORMS_PER_GAMMA]: Marsaglia-Tsang with a
    fixed number of attempts (the first accepted wins), then the boost U^(1 / alpha)."""
    u = u.float().clamp(2.0 ** -25, 1 - 2.0 ** -24)
    d = alpha + (1 - 1 / 3)
    c = torch.rsqrt(9 * d)
    g = None
    for i in range(GAMMA_ATTEMPTS - 1, -1, -1):
        x = torch.special.ndtri(u[..., 2 * i])
        v = (1 + c * x).clamp_min(1e-6) ** 3
        ok = u[..., 2 * i + 1].log() < 0.5 * x * x + d - d * v + d * v.log()
        g = d * v if g is None else torch.where(ok, d * v, g)
    return g * u[..., -1] ** (1 / alpha)


def cat_draw(logw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Positions [B] drawn from softmax(logw) [B, K] with uniforms u [B] (inverse CDF)."""
    cdf = torch.softmax(logw.float(), -1).cumsum(-1)
    x = u.float().clamp(max=1 - 2.0 ** -24)[:, None] * cdf[:, -1:]
    return (cdf <= x).sum(-1).clamp(max=logw.shape[-1] - 1)


def refit(c: DSliderConfig, alpha: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    if c.refit_iters == 0:
        return fit_dirichlet(m_new, c.fit_iters)
    return fit_dirichlet(m_new, c.refit_iters, start=alpha)


def _stack(c: DSliderConfig, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.stack([s["tce_s"], s["tce_n"], s["ent_s"], s["ent_n"]], -1)
    sig = torch.stack([s["tcv_s"], s["tcv_n"], s["varent_s"], s["varent_n"]], -1).clamp_min(0).sqrt()
    return a, sig


def init_state(c: DSliderConfig, top_lp: torch.Tensor, H: torch.Tensor, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """States [B] from each row's first distribution (see the reference `init_state`)."""
    y = normalize(top_lp, c.noise_floor).to(_wide(top_lp))
    alpha = (c.init_concentration * y.exp()).clamp_min(ALPHA_MIN)
    m = (torch.special.digamma(alpha) - torch.special.digamma(alpha.sum(-1, keepdim=True))).float()
    alpha = alpha.float()
    yk = top_lp[:, :c.outlier_topk]
    zero = torch.zeros_like(H)
    return {"alpha": alpha, "m": m, "temp": torch.ones_like(H), "ent_n": H, "varent_n": V, "ent_s": H,
            "varent_s": zero, "tce_n": -yk.mean(-1), "tcv_n": yk.var(-1, unbiased=False), "tce_s": H, "tcv_s": zero,
            "dir_ent": -log_dirichlet(m, alpha), "topk_ent": ent(normalize(yk, c.noise_floor))[0]}


def dslider_step(c: DSliderConfig, s: dict[str, torch.Tensor], top_lp: torch.Tensor, H: torch.Tensor,
                 V: torch.Tensor, u: torch.Tensor):
    """One step for a group: (positions [B] in the support, codes [B], new state, extras).

    top_lp [B, K]: the model's log-probabilities of each row's K most likely tokens, most
    likely first; H, V [B] in nats; u [B, draws] the rows' uniforms.
    """
    K, k = c.support, c.outlier_topk
    top_lp = top_lp.float()
    lp = top_lp.masked_fill(top_lp < c.noise_floor, LN_EPS)
    ysup = normalize(top_lp, c.noise_floor)
    a, sig = _stack(c, s)
    W = torch.tensor(c.outlier_bilinear, dtype=torch.float32, device=H.device)
    lin_a = torch.tensor(c.linear_state_ent, device=H.device)
    lin_s = torch.tensor(c.linear_state_std, device=H.device)
    score = (((a @ W) * sig).sum(-1) + a @ lin_a + sig @ lin_s + c.linear_naked_ent * H
             + c.linear_naked_varent * V + c.outlier_bias)
    outlier = score > 0
    yk = normalize(top_lp[:, :k], c.noise_floor)
    Hk = ent(yk)[0]
    is_argmax = ~outlier & (Hk < c.argmax_threshold[0] * s["topk_ent"] + c.argmax_threshold[1])
    tau = a @ torch.tensor(c.target_entropy, device=H.device) + c.target_entropy_temp / s["temp"].clamp_min(1e-6)
    # both solves in one batch: the top-k padded with a weight that no temperature in reach revives
    both = torch.cat([ysup, torch.nn.functional.pad(yk, (0, K - k), value=-1e4)])
    targets = torch.cat([(tau + c.target_entropy_bias).clamp(1e-3, 0.99 * math.log(K)),
                         s["topk_ent"].clamp(1e-3, 0.99 * math.log(k))])
    T, t_in = temp_solve(both, targets, c.temp_iters).split(ysup.shape[0])
    pos_in = cat_draw(yk / t_in[:, None], u[:, 0])
    q = normalize(ysup / T.clamp(1e-4, 1e4)[:, None], c.noise_floor)
    kl_m = (q.exp() * (q - s["m"])).sum(-1).clamp_min(0)
    gamma = c.emwa_logp_base ** (-c.emwa_logp_exp_factor / (kl_m + EPS))
    m_new = gamma[:, None] * q + (1 - gamma[:, None]) * s["m"]
    alpha_new = refit(c, s["alpha"], m_new)
    nll = -log_dirichlet(q, s["alpha"])
    use_dir = outlier & (nll < c.dirichlet_threshold[0] * s["dir_ent"] + c.dirichlet_threshold[1])
    if c.wild:
        g = gamma_draw(alpha_new, u[:, 2:2 + K * UNIFORMS_PER_GAMMA].reshape(-1, K, UNIFORMS_PER_GAMMA))
        pi = g / g.sum(-1, keepdim=True).clamp_min(1e-30)
    else:
        pi = alpha_new / alpha_new.sum(-1, keepdim=True)
    kl_pi = (pi * ((pi + EPS).log() - q)).sum(-1).clamp_min(0)
    rho = 1 - c.perturb_base_coeff ** (-c.perturb_exp_coeff / (kl_pi + EPS))
    r = rho[:, None] * pi + (1 - rho[:, None]) * q.exp()
    code = torch.where(outlier, torch.where(use_dir, DIRICHLET, OOD), torch.where(is_argmax, ARGMAX, INLIER))
    pos = torch.where(code == INLIER, pos_in, torch.zeros_like(pos_in))
    pos = torch.where(code == DIRICHLET, r.argmax(-1), pos)
    pos = torch.where(code == OOD, cat_draw((pi + EPS).log(), u[:, 1]), pos)
    Hs, Vs = ent((r + EPS).log())
    lp_s = (r.gather(1, pos[:, None])[:, 0] + EPS).log()
    lp_n = lp.gather(1, pos[:, None])[:, 0]
    n = _next_state(c, s, alpha_new, m_new, T, H, V, Hk, Hs, Vs, nll, lp_n, lp_s)
    extras = dict(zip(EXTRA_KEYS, (score, T, t_in, Hk, nll, rho, s["topk_ent"], s["dir_ent"])))
    return pos, code, n, extras


def _next_state(c: DSliderConfig, s: dict[str, torch.Tensor], alpha_new, m_new, T, H, V, Hk, Hs, Vs, nll, lp_n,
                lp_s) -> dict[str, torch.Tensor]:
    """The running averages after a step (the reference's order and coefficients)."""
    n = {"alpha": alpha_new, "m": m_new, "temp": ema(c.emwa_temp_coeff, T, s["temp"]),
         "ent_n": ema(c.emwa_ent_naked_coeff, H, s["ent_n"]), "varent_n": ema(c.emwa_varent_naked_coeff, V, s["varent_n"]),
         "topk_ent": ema(c.emwa_topk_ent_naked_coeff, Hk, s["topk_ent"]),
         "ent_s": ema(c.emwa_ent_scaffold_coeff, Hs, s["ent_s"]),
         "varent_s": ema(c.emwa_varent_scaffold_coeff, Vs, s["varent_s"]),
         "dir_ent": ema(c.emwa_dir_ent_coeff, nll, s["dir_ent"])}
    for side, name, lpx in (("n", "naked", lp_n), ("s", "scaffold", lp_s)):
        tce = ema(getattr(c, f"token_cross_ent_{name}_coeff"), -lpx, s[f"tce_{side}"])
        n[f"tce_{side}"] = tce
        n[f"tcv_{side}"] = ema(getattr(c, f"token_cross_var_{name}_coeff"), (tce + lpx) ** 2, s[f"tcv_{side}"])
    return n


class DSliderStates:
    """Per-row DSlider state for every configuration in use, in the backend's row order."""

    def __init__(self) -> None:
        self._by_config: dict[DSliderConfig, tuple[dict[str, torch.Tensor], list[bool]]] = {}

    def clear(self) -> None:
        self._by_config.clear()

    def add_rows(self, n: int) -> None:
        """n new rows at the end, without state yet (their first step initialises it)."""
        for cfg, (s, ready) in self._by_config.items():
            for name, t in s.items():
                s[name] = torch.cat([t, t.new_zeros((n,) + t.shape[1:])])
            ready.extend([False] * n)

    def select(self, rows: Sequence[int]) -> None:
        if not self._by_config:
            return
        dev = next(iter(self._by_config.values()))[0]["temp"].device
        idx = torch.tensor(list(rows), device=dev, dtype=torch.long)
        for cfg, (s, ready) in list(self._by_config.items()):
            self._by_config[cfg] = ({k: t.index_select(0, idx) for k, t in s.items()}, [ready[r] for r in rows])

    def step(self, policy: DSlider, B: int, rows: Sequence[int], top_lp: torch.Tensor, top_id: torch.Tensor,
             H: torch.Tensor, V: torch.Tensor, u: torch.Tensor):
        """Tokens, codes and extras for a group's rows (H, V in nats); their states move on."""
        c = policy.config
        if c not in self._by_config:
            shapes = {name: (B, c.support) if per_pos else (B,) for name, per_pos in STATE_FIELDS}
            self._by_config[c] = ({n: torch.zeros(sh, device=H.device) for n, sh in shapes.items()}, [False] * B)
        s_all, ready = self._by_config[c]
        idx = torch.tensor(list(rows), device=H.device, dtype=torch.long)
        s = {k: t.index_select(0, idx) for k, t in s_all.items()}
        fresh = [i for i, r in enumerate(rows) if not ready[r]]
        if fresh:  # known on the host
            f = torch.tensor(fresh, device=H.device, dtype=torch.long)
            init = init_state(c, top_lp.index_select(0, f).float(), H.index_select(0, f), V.index_select(0, f))
            for k in s:
                s[k] = s[k].index_copy(0, f, init[k].to(s[k].dtype))
            for i in fresh:
                ready[rows[i]] = True
        pos, code, new, extras = dslider_step(c, s, top_lp, H, V, u)
        for k, t in new.items():
            s_all[k].index_copy_(0, idx, t.to(s_all[k].dtype))
        return top_id.gather(1, pos[:, None])[:, 0], code, extras

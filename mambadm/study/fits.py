"""Scaling-law fits: single power laws in log space and the joint L(N, D) = E + A/N^a + B/D^b, with bootstrap CIs.

Both fits take plain arrays (one entry per grid cell) so they serve scores, losses, synthetic checks alike.

Degrees of freedom: a power law has 2 parameters, so n points leave n - 2. With 0 (two points) the line passes
through both exactly: no R² and no interval are reported (`ci_method` "exact"), as a fit that cannot miss says
nothing about how well the law holds.

Bootstrap (the paper gives none; this is our choice, written down in docs/scaling.md):
- power law: points are resampled *within* each distinct x (seeds of one cell size are exchangeable, `ci_method`
  "seeds"); when every x has a single point that resampling is degenerate, so the fit's residuals (rescaled by
  sqrt(n / (n - 2))) are resampled instead (`ci_method` "residuals", needs >= 1 degree of freedom);
- joint law: cells are resampled with replacement (a joint fit needs >= 9 cells, enough for a case bootstrap);
  each resample starts from the full fit (the full fit itself is the best of a small grid of starts).
Confidence intervals are percentile intervals over the bootstrap fits.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import least_squares


class FitError(ValueError):
    """Data that cannot be fitted (too few points, non-positive values); the message says why."""


@dataclass
class PowerLawFit:
    """y ≈ coef · x^exponent, fitted as log y = log coef + exponent · log x."""

    coef: float
    exponent: float
    exponent_ci: tuple[float, float] | None  # None for an exact fit (0 degrees of freedom)
    coef_ci: tuple[float, float] | None
    r2: float | None  # in log space; None for an exact fit
    n_points: int
    n_dropped: int = 0  # points with y <= 0 that log space cannot hold
    confidence: float = 0.95
    dof: int = 0  # degrees of freedom: points - 2 parameters
    ci_method: str = "exact"  # exact (no interval) | seeds (within-x resampling) | residuals (residual bootstrap)

    @property
    def exact(self) -> bool:
        return self.dof == 0

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.coef * np.asarray(x, dtype=float) ** self.exponent

    def gain(self, ratio: float = 2.0) -> float:
        """Relative change of y when x is multiplied by `ratio`: ratio^exponent - 1."""
        return ratio**self.exponent - 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JointFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, fitted on log L with a robust (soft-L1) loss."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    rmse_log: float = float("nan")
    n_points: int = 0
    confidence: float = 0.95

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def to_dict(self) -> dict:
        return asdict(self)


def _ols_loglog(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """Least squares of ly = b0 + b1·lx; returns (b0, b1)."""
    design = np.stack([np.ones_like(lx), lx], axis=1)
    (b0, b1), *_ = np.linalg.lstsq(design, ly, rcond=None)
    return float(b0), float(b1)


def _percentile_ci(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def fit_power_law(x, y, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> PowerLawFit:
    """Fits y = coef · x^exponent in log space with a bootstrap CI (see the module docstring).

    Points with y <= 0 are dropped (counted in `n_dropped`); at least two distinct x must remain.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise FitError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
    if np.any(~np.isfinite(x)) or np.any(x <= 0):
        raise FitError("x must be finite and positive")
    keep = np.isfinite(y) & (y > 0)
    n_dropped = int((~keep).sum())
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        raise FitError(f"need at least 2 distinct x with y > 0, have {np.unique(x).size} ({n_dropped} dropped)")
    lx, ly = np.log(x), np.log(y)
    b0, b1 = _ols_loglog(lx, ly)
    dof = len(ly) - 2
    if dof == 0:
        return PowerLawFit(coef=math.exp(b0), exponent=b1, exponent_ci=None, coef_ci=None, r2=None, n_points=2,
                           n_dropped=n_dropped, confidence=confidence, dof=0, ci_method="exact")
    fitted = b0 + b1 * lx
    ss_res, ss_tot = float(((ly - fitted) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0

    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(lx == v) for v in np.unique(lx)]
    stratified = any(g.size > 1 for g in groups)
    residuals = (ly - fitted) * math.sqrt(len(ly) / dof)
    boot = np.empty((n_boot, 2))
    for i in range(n_boot):
        if stratified:
            idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
            boot[i] = _ols_loglog(lx[idx], ly[idx])
        else:
            boot[i] = _ols_loglog(lx, fitted + rng.choice(residuals, size=len(ly), replace=True))
    return PowerLawFit(
        coef=math.exp(b0), exponent=b1, exponent_ci=_percentile_ci(boot[:, 1], confidence),
        coef_ci=tuple(math.exp(v) for v in _percentile_ci(boot[:, 0], confidence)), r2=r2,
        n_points=int(len(y)), n_dropped=n_dropped, confidence=confidence, dof=dof,
        ci_method="seeds" if stratified else "residuals",
    )


def _starts(ln: np.ndarray, ld: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    """A small grid of starting points (log E, log A, alpha, log B, beta)."""
    lmin = float(np.log(loss.min()))
    return [np.array([e0, lmin + a0 * ln.mean(), a0, lmin + b0 * ld.mean(), b0])
            for e0 in (lmin - 2.0, lmin - 0.5) for a0 in (0.2, 0.6) for b0 in (0.2, 0.6)]


def _joint_once(n: np.ndarray, d: np.ndarray, loss: np.ndarray,
                starts: list[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Best fit over `starts` (default: a small grid); parameters (log E, log A, alpha, log B, beta).
    Returns (params, rmse of log L)."""
    ln, ld, ll = np.log(n), np.log(d), np.log(loss)

    def residual(p: np.ndarray) -> np.ndarray:
        e, a, alpha, b, beta = p
        pred = np.exp(e) + np.exp(a - alpha * ln) + np.exp(b - beta * ld)
        return np.log(pred) - ll

    best, best_cost = None, np.inf
    for start in starts if starts is not None else _starts(ln, ld, loss):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = least_squares(residual, start, loss="soft_l1", f_scale=0.1,
                                bounds=([-30, -30, 0.0, -30, 0.0], [30, 60, 3.0, 60, 3.0]))
        if res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best, float(np.sqrt(np.mean(residual(best) ** 2)))


def fit_joint(n, d, loss, n_boot: int = 200, confidence: float = 0.95, seed: int = 0) -> JointFit:
    """Fits L(N, D) = E + A/N^alpha + B/D^beta; needs >= 3 distinct N and >= 3 distinct D."""
    n, d, loss = (np.asarray(v, dtype=float).ravel() for v in (n, d, loss))
    keep = np.isfinite(loss) & (loss > 0)
    n, d, loss = n[keep], d[keep], loss[keep]
    if np.unique(n).size < 3 or np.unique(d).size < 3:
        raise FitError(f"joint fit needs >= 3 model sizes and >= 3 data sizes, have "
                       f"{np.unique(n).size} x {np.unique(d).size}")
    p, rmse = _joint_once(n, d, loss)
    rng = np.random.default_rng(seed)
    names = ("E", "A", "alpha", "B", "beta")
    boot = []
    start = np.clip(p, [-29, -29, 0.01, -29, 0.01], [29, 59, 2.9, 59, 2.9])  # strictly inside the bounds
    for _ in range(n_boot):
        idx = rng.choice(len(loss), size=len(loss), replace=True)
        if np.unique(n[idx]).size < 3 or np.unique(d[idx]).size < 3:
            continue
        q, _ = _joint_once(n[idx], d[idx], loss[idx], starts=[start])
        boot.append([math.exp(q[0]), math.exp(q[1]), q[2], math.exp(q[3]), q[4]])
    boot_arr = np.asarray(boot) if boot else np.full((1, 5), np.nan)
    ci = {k: _percentile_ci(boot_arr[:, i], confidence) for i, k in enumerate(names)}
    return JointFit(E=math.exp(p[0]), A=math.exp(p[1]), alpha=float(p[2]), B=math.exp(p[3]), beta=float(p[4]),
                    ci=ci, rmse_log=rmse, n_points=int(len(loss)), confidence=confidence)

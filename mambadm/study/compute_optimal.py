"""Compute-optimal analysis of a grid's results.csv: isoFLOP profiles, the frontier N*(C) and D*(C), the parametric
L(N, D), bootstrap intervals, a leave-largest-out check, a forecast and a proposed next grid.

    python -m mambadm.study.compute_optimal RESULTS.csv [--out DIR] [--loss best_val_loss] [--boot 200]
                                            [--forecast N D] [--plan BUDGET] [--no-report]

Writes into DIR (default: the CSV's folder) `compute_optimal.json`, `compute_optimal.md`, `isoflop.png`,
`frontier.png`, then the study's report (`report.md`, `report.html`, mambadm.study.report).

Two of Hoffmann et al.'s (2022) three methods, per family (each number in the output says which gave it):
- **isoFLOP profiles**: the cells of one FLOP budget C (the isoflop grid rule's cell keys `...-c<C>-s<seed>`; other
  grids: cells whose FLOPs agree within 25%) give log L vs log N, fitted by a parabola; its minimum is N*(C). Then
  log N*(C) = log G + a log C by least squares over the budgets whose profile is informative (curved upwards with
  95% confidence, the minimum and its interval inside the sampled sizes); D*(C) = C / flops_per_token(N*)
  tokens, flops_per_token(N) a power law fitted to the cells' FLOPs / tokens.
- **parametric**: L(N, D) = E + A/N^alpha + B/D^beta, Huber loss (delta = 1e-3) on log residuals, L-BFGS-B from a grid
  of starts (the best wins). With C = kappa·N·D (kappa: the cells' median FLOPs / (N · tokens)) the frontier is
  N*(C) = G (C/kappa)^(beta/(alpha+beta)), D*(C) = (C/kappa) / N*(C).

What D is: offline data repeats, so a fit says which D it uses: `tokens` (tokens trained, 3 per timestep) or
`transitions` (unique transitions of the cell's training subset). The parametric law is fitted for each kind that
takes >= 3 values in the grid; the compute frontier needs D = tokens. Epochs = tokens / (3 · transitions) tell how
often a cell repeated its data.

Intervals (95%, percentile) come from one bootstrap of the cells with a fixed RNG: every replicate keeps the design
and resamples each design point's seeds (deviations from the point's mean rescaled by sqrt(n / (n - 1)), which makes
the replicate's spread unbiased); when no point has two seeds, the fit's residuals are resampled instead.
A fit whose intervals do not pin it down says "not informative" with the reason instead of a number.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from data_pipeline.atomic import atomic_write_text
from mambadm.model.base import TOKENS_PER_STEP
from mambadm.study.scaling import model_size_column, read_results

HUBER_DELTA = 1e-3
CONFIDENCE = 0.95
BUDGET_KEY = re.compile(r"-c([0-9.]+e-?[0-9]+)-s\d+$")  # the isoflop grid rule's cell keys
BUDGET_TOLERANCE = 1.25  # budget-less grids: cells whose FLOPs agree within this factor share a budget
EXPONENT_BOUNDS = (1e-3, 3.0)
LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}  # the near-L1 Huber loss needs tight tolerances
MIN_R2 = 0.5  # a parametric fit must explain at least this share of the variance of log L
MAX_FRONTIER_CI_WIDTH = 1.0  # an exponent known to worse than +-0.5 is not a result
NEXT_GRID_SPAN = (0.25, 0.5, 1.0, 2.0, 4.0)  # a proposed next grid: these multiples of the predicted N*


@dataclass
class Cells:
    """One family's finished cells as arrays (one entry per cell)."""

    family: str
    n: np.ndarray  # model size (non-embedding parameters when every row has them)
    tokens: np.ndarray  # tokens trained
    transitions: np.ndarray  # unique transitions of the training subset
    flops: np.ndarray
    budget: np.ndarray  # the FLOP budget the cell belongs to
    loss: np.ndarray

    def d(self, kind: str) -> np.ndarray:
        return self.tokens if kind == "tokens" else self.transitions

    def groups(self) -> list[np.ndarray]:
        """Indices of the seeds of each design point (same N, D, unique transitions and budget)."""
        keys = np.stack([self.n, self.tokens, self.transitions, self.budget], axis=1)
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]

    def subset(self, keep: np.ndarray) -> Cells:
        return Cells(self.family, *(getattr(self, k)[keep] for k in ("n", "tokens", "transitions", "flops", "budget",
                                                                          "loss")))


def budgets_of(keys: list[str], flops: np.ndarray) -> np.ndarray:
    """Each cell's FLOP budget: from the isoflop rule's cell key when every key has one, else FLOPs clustered in
    log space (a new budget starts where sorted FLOPs jump by more than BUDGET_TOLERANCE), labelled by their
    geometric mean."""
    tagged = [BUDGET_KEY.search(k) for k in keys]
    if tagged and all(tagged):
        return np.array([float(m.group(1)) for m in tagged])
    order = np.argsort(flops)
    budget = np.empty_like(flops)
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or flops[order[i]] > BUDGET_TOLERANCE * flops[order[i - 1]]:
            members = order[start:i]
            budget[members] = math.exp(float(np.mean(np.log(flops[members]))))
            start = i
    return budget


def load_cells(rows: list[dict], loss: str) -> tuple[list[Cells], str]:
    """The rows of results.csv per family (rows without a finite loss, FLOPs or tokens are left out)."""
    n_col = model_size_column(rows)
    out = []
    for family in sorted({r["family"] for r in rows}):
        sel = [r for r in rows if r["family"] == family and all(
            math.isfinite(r.get(c, math.nan)) and r.get(c, 0) > 0 for c in (loss, "flops", "tokens", n_col))]
        if not sel:
            continue
        flops = np.array([r["flops"] for r in sel])
        out.append(Cells(family, np.array([r[n_col] for r in sel]), np.array([r["tokens"] for r in sel]),
                         np.array([r["transitions"] for r in sel]), flops,
                         budgets_of([r.get("cell", "") for r in sel], flops), np.array([r[loss] for r in sel])))
    return out, n_col


# ---------------------------------------------------------------------------------------------- bootstrap

def resample_log_loss(log_loss: np.ndarray, groups: list[np.ndarray], fitted: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """One bootstrap replicate of log L on the same cells (see the module docstring)."""
    if not any(g.size > 1 for g in groups):
        residuals = log_loss - fitted
        return fitted + rng.choice(residuals, size=residuals.size, replace=True)
    out = log_loss.copy()
    for g in groups:
        if g.size > 1:
            mean = log_loss[g].mean()
            out[g] = mean + math.sqrt(g.size / (g.size - 1)) * (rng.choice(log_loss[g], size=g.size) - mean)
    return out


def interval(samples: np.ndarray) -> list[float]:
    """The percentile interval of the finite samples (nan, nan when fewer than 10 are finite)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size < 10:
        return [math.nan, math.nan]
    lo, hi = np.percentile(samples, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------- isoFLOP profiles

def parabola_minimum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients (c2, c1, c0) of y = c2 x² + c1 x + c0 and the x of its minimum (nan unless c2 > 0)."""
    coef = np.polyfit(x, y, 2)
    return coef, (-coef[1] / (2 * coef[0]) if coef[0] > 0 else math.nan)


def power_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of y = b0 + b1 x (log-log lines); returns (b0, b1)."""
    b1, b0 = np.polyfit(x, y, 1)
    return float(b0), float(b1)


def isoflop_analysis(cells: Cells, n_boot: int, rng: np.random.Generator) -> dict:
    """Per budget: the profile, its N*(C) with interval and verdict; then the frontier fitted through them."""
    ln, ll = np.log(cells.n), np.log(cells.loss)
    budgets = sorted(set(cells.budget.tolist()))
    members = {c: np.flatnonzero(cells.budget == c) for c in budgets}
    fittable = [c for c in budgets if np.unique(cells.n[members[c]]).size >= 3]
    fitted = ll.copy()
    full = {}
    for c in fittable:
        idx = members[c]
        full[c] = parabola_minimum(ln[idx], ll[idx])
        fitted[idx] = np.polyval(full[c][0], ln[idx])
    groups = cells.groups()
    fpt_b0, fpt_b1 = power_line(ln, np.log(cells.flops / cells.tokens))  # flops per token vs N
    boot_x = {c: np.full(n_boot, math.nan) for c in fittable}
    boot_curv = {c: np.full(n_boot, math.nan) for c in fittable}
    curve_x = {c: np.linspace(ln[members[c]].min(), ln[members[c]].max(), 40) for c in fittable}
    boot_curve = {c: np.full((n_boot, 40), math.nan) for c in fittable}
    for b in range(n_boot):
        y = resample_log_loss(ll, groups, fitted, rng)
        for c in fittable:
            idx = members[c]
            coef, x_star = parabola_minimum(ln[idx], y[idx])
            boot_curv[c][b], boot_x[c][b] = coef[0], x_star
            boot_curve[c][b] = np.polyval(coef, curve_x[c])
    profiles = []
    for c in budgets:
        idx = members[c]
        entry = {"budget": c, "cells": int(idx.size), "sizes": int(np.unique(cells.n[idx]).size),
                 "tokens_range": [float(cells.tokens[idx].min()), float(cells.tokens[idx].max())]}
        if c not in full:
            profiles.append(entry | {"informative": False, "reason": "fewer than 3 model sizes at this budget"})
            continue
        coef, x_star = full[c]
        curv_ci, x_ci = interval(boot_curv[c]), interval(boot_x[c])
        reason = profile_doubt((ln[idx].min(), ln[idx].max()), x_star, x_ci, curv_ci)
        band = np.nanpercentile(boot_curve[c], [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)], axis=0)
        entry |= {"coef": coef.tolist(), "curvature_ci": curv_ci, "informative": not reason, "reason": reason,
                  "n_star": math.exp(x_star) if math.isfinite(x_star) else math.nan,
                  "n_star_ci": [math.exp(v) if math.isfinite(v) else math.nan for v in x_ci],
                  "curve": {"n": np.exp(curve_x[c]).tolist(), "loss": np.exp(np.polyval(coef, curve_x[c])).tolist(),
                            "lo": np.exp(band[0]).tolist(), "hi": np.exp(band[1]).tolist()}}
        if not reason:
            entry["d_star_tokens"] = c / math.exp(fpt_b0 + fpt_b1 * x_star)
        profiles.append(entry)
    usable = [p["budget"] for p in profiles if p["informative"]]
    frontier = frontier_from_profiles(usable, full, boot_x, (fpt_b0, fpt_b1))
    return {"profiles": profiles, "frontier": frontier, "flops_per_token": {"log_coef": fpt_b0, "exponent": fpt_b1}}


def profile_doubt(sampled: tuple[float, float], x_star: float, x_ci: list[float], curv_ci: list[float]) -> str:
    """Why one isoFLOP profile's optimum cannot be trusted ("" when it can). Sizes are in log N."""
    if not curv_ci[0] > 0:
        return f"flat or not curved upwards: curvature interval [{curv_ci[0]:.3g}, {curv_ci[1]:.3g}] reaches 0"
    if not sampled[0] <= x_star <= sampled[1]:
        return "the minimum lies outside the sampled sizes (extrapolated)"
    if not sampled[0] <= x_ci[0] <= x_ci[1] <= sampled[1]:  # nan-safe: a nan fails
        return "the minimum's interval reaches beyond the sampled sizes"
    if not x_ci[0] <= x_star <= x_ci[1]:
        return "unstable: the fitted minimum lies outside its own bootstrap interval"
    return ""


def frontier_from_profiles(budgets: list[float], full: dict, boot_x: dict, fpt: tuple[float, float]) -> dict:
    """log N*(C) = log G + a log C through the informative budgets' optima; D*(C) = C / flops_per_token(N*)."""
    method = "isoFLOP profiles (parabola in log N per budget; least squares of log N* on log C)"
    if len(budgets) < 2:
        return {"method": method, "informative": False, "budgets": budgets,
                "reason": f"{len(budgets)} budget(s) with an informative profile; the frontier needs >= 2"}
    lc = np.log(budgets)

    def fit(xs: np.ndarray) -> tuple[float, float, float]:
        b0, a = power_line(lc, xs)
        d0, b = power_line(lc, lc - fpt[0] - fpt[1] * xs)  # log D* = log C - log flops_per_token(N*)
        return b0, a, b, d0

    xs_full = np.array([full[c][1] for c in budgets])
    g, a, b, d0 = fit(xs_full)
    boot = np.array([fit(np.array([boot_x[c][i] for c in budgets])) for i in range(len(boot_x[budgets[0]]))])
    a_ci, b_ci = interval(boot[:, 1]), interval(boot[:, 2])
    width = a_ci[1] - a_ci[0]
    reason = "" if width <= MAX_FRONTIER_CI_WIDTH else f"the exponent's interval is {width:.2f} wide"
    if not math.isfinite(width):
        reason = "too few bootstrap replicates kept every budget's minimum"
    return {"method": method, "informative": not reason, "reason": reason, "budgets": budgets,
            "log_g": g, "a": a, "a_ci": a_ci, "log_d0": d0, "b": b, "b_ci": b_ci,
            "boot": boot[:, :4].tolist()}


def profile_frontier_at(frontier: dict, budget: float) -> dict:
    """N*(C) and D*(C) (tokens) of the profile frontier at `budget`, with intervals from its bootstrap lines."""
    lc = math.log(budget)
    boot = np.asarray(frontier["boot"])
    n_boot = np.exp(boot[:, 0] + boot[:, 1] * lc)
    d_boot = np.exp(boot[:, 3] + boot[:, 2] * lc)
    return {"n_star": math.exp(frontier["log_g"] + frontier["a"] * lc), "n_star_ci": interval(n_boot),
            "d_star_tokens": math.exp(frontier["log_d0"] + frontier["b"] * lc), "d_star_tokens_ci": interval(d_boot)}


# ---------------------------------------------------------------------------------------------- parametric L(N, D)

def _huber_objective(theta: np.ndarray, ln: np.ndarray, ld: np.ndarray, ll: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of Huber(log L̂ - log L) and its gradient; theta = (log E, log A, alpha, log B, beta) and
    log L̂ = logsumexp(log E, log A - alpha log N, log B - beta log D)."""
    e, a, alpha, b, beta = theta
    terms = np.stack([np.full_like(ln, e), a - alpha * ln, b - beta * ld])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - ll
    weights /= total
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), -(dr * weights[1] * ln).sum(),
                     (dr * weights[2]).sum(), -(dr * weights[2] * ld).sum()])
    return float(value), grad


def parametric_starts(ln: np.ndarray, ld: np.ndarray, ll: np.ndarray) -> list[np.ndarray]:
    """A grid of 18 starts: exponents 0.2 / 0.6 / 1.2, E well or just below the lowest loss, A and B at its level."""
    lmin = float(ll.min())
    return [np.array([e0, lmin + al * ln.mean(), al, lmin + be * ld.mean(), be])
            for e0 in (lmin - 2.0, lmin - 0.2) for al in (0.2, 0.6, 1.2) for be in (0.2, 0.6, 1.2)]


def fit_parametric_once(ln: np.ndarray, ld: np.ndarray, ll: np.ndarray, starts: list[np.ndarray]) -> np.ndarray:
    """The best L-BFGS-B fit over `starts`."""
    bounds = [(-20, 20), (-20, 80), EXPONENT_BOUNDS, (-20, 80), EXPONENT_BOUNDS]
    best, best_value = starts[0], math.inf
    for start in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(_huber_objective, start, args=(ln, ld, ll), jac=True, method="L-BFGS-B", bounds=bounds,
                           options=LBFGS_OPTIONS)
        if res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    return best


def predict_log_loss(theta: np.ndarray, n, d) -> np.ndarray:
    e, a, alpha, b, beta = theta
    return np.logaddexp(np.logaddexp(e, a - alpha * np.log(n)), b - beta * np.log(d))


def parametric_frontier(theta: np.ndarray, kappa: float, budget: float) -> tuple[float, float]:
    """(N*, D*) minimising L(N, D) subject to kappa · N · D = budget (D in tokens)."""
    e, a, alpha, b, beta = theta
    g = ((alpha * math.exp(a)) / (beta * math.exp(b))) ** (1 / (alpha + beta))
    n_star = g * (budget / kappa) ** (beta / (alpha + beta))
    return n_star, budget / kappa / n_star


def parametric_analysis(cells: Cells, d_kind: str, n_boot: int, rng: np.random.Generator) -> dict:
    """L(N, D) with D = `d_kind`, bootstrap intervals on every parameter and, for D = tokens, on the frontier."""
    method = "parametric L(N, D) = E + A/N^alpha + B/D^beta (Huber on log residuals, L-BFGS-B, grid of starts)"
    ln, ld, ll = np.log(cells.n), np.log(cells.d(d_kind)), np.log(cells.loss)
    theta = fit_parametric_once(ln, ld, ll, parametric_starts(ln, ld, ll))
    fitted = predict_log_loss(theta, cells.n, cells.d(d_kind))
    groups = cells.groups()
    boot = np.array([fit_parametric_once(ln, ld, resample_log_loss(ll, groups, fitted, rng), [theta])
                     for _ in range(n_boot)])
    ss_tot = float(((ll - ll.mean()) ** 2).sum())
    r2 = 1 - float(((ll - fitted) ** 2).sum()) / ss_tot if ss_tot > 0 else 0.0
    names = ("E", "A", "alpha", "B", "beta")
    values = [math.exp(theta[0]), math.exp(theta[1]), theta[2], math.exp(theta[3]), theta[4]]
    boot_values = np.stack([np.exp(boot[:, 0]), np.exp(boot[:, 1]), boot[:, 2], np.exp(boot[:, 3]), boot[:, 4]], 1)
    ci = {k: interval(boot_values[:, i]) for i, k in enumerate(names)}
    reasons = [f"{k}'s interval [{ci[k][0]:.3g}, {ci[k][1]:.3g}] reaches 0" for k in ("alpha", "beta")
               if not ci[k][0] > 0.01]
    reasons += [f"{k} runs into its bound {EXPONENT_BOUNDS[1]}" for k in ("alpha", "beta")
                if not ci[k][1] < 0.97 * EXPONENT_BOUNDS[1]]
    if r2 < MIN_R2:
        reasons.append(f"the law explains {100 * max(r2, 0):.0f}% of the variance of log L (< {100 * MIN_R2:.0f}%)")
    out = {"method": method, "d_kind": d_kind, **dict(zip(names, map(float, values))), "ci": ci, "r2_log": r2,
           "rmse_log": float(np.sqrt(np.mean((ll - fitted) ** 2))), "cells": int(ll.size),
           "informative": not reasons, "reason": "; ".join(reasons), "theta": theta.tolist(), "boot": boot.tolist()}
    if d_kind == "tokens":
        kappa = float(np.median(cells.flops / (cells.n * cells.tokens)))
        out["kappa"] = kappa
        out["a"], out["b"] = theta[4] / (theta[2] + theta[4]), theta[2] / (theta[2] + theta[4])
        out["a_ci"] = interval(boot[:, 4] / (boot[:, 2] + boot[:, 4]))
        out["b_ci"] = interval(boot[:, 2] / (boot[:, 2] + boot[:, 4]))
    return out


def parametric_at(fit: dict, budget: float) -> dict:
    """N*(C), D*(C) (tokens) of a parametric fit with D = tokens, with intervals over its bootstrap."""
    n_star, d_star = parametric_frontier(np.array(fit["theta"]), fit["kappa"], budget)
    boot = np.array([parametric_frontier(t, fit["kappa"], budget) for t in np.asarray(fit["boot"])])
    return {"n_star": n_star, "n_star_ci": interval(boot[:, 0]), "d_star_tokens": d_star,
            "d_star_tokens_ci": interval(boot[:, 1])}


def forecast(fit: dict, n: float, d: float) -> dict:
    """The parametric law's loss at (N, D) with the interval of its bootstrap fits."""
    boot = np.exp([predict_log_loss(t, n, d) for t in np.asarray(fit["boot"])])
    return {"n": n, "d": d, "d_kind": fit["d_kind"], "loss": float(np.exp(predict_log_loss(np.array(fit["theta"]),
                                                                                             n, d))),
            "loss_ci": interval(boot), "informative": fit["informative"], "reason": fit["reason"]}


# ---------------------------------------------------------------------------------------------- leave-largest-out

def leave_largest_out(cells: Cells, d_kind: str | None, profiles: dict) -> list[dict]:
    """Fits without the largest model size, and without the largest budget, then predicts what was left out:
    the held-out cells' losses (parametric law) and, for the budget, N*(C) (both frontiers) against that budget's
    own profile minimum."""
    checks = []
    budgets = sorted(set(cells.budget.tolist()))
    held_sets = [("largest model size", cells.n == cells.n.max())]
    if len(budgets) >= 3:
        held_sets.append(("largest budget", cells.budget == budgets[-1]))
    for what, held in held_sets:
        rest = cells.subset(~held)
        entry: dict = {"left_out": what, "cells": int(held.sum())}
        if d_kind and np.unique(rest.n).size >= 2 and np.unique(rest.d(d_kind)).size >= 2:
            ln, ld, ll = np.log(rest.n), np.log(rest.d(d_kind)), np.log(rest.loss)
            theta = fit_parametric_once(ln, ld, ll, parametric_starts(ln, ld, ll))
            pred = np.exp(predict_log_loss(theta, cells.n[held], cells.d(d_kind)[held]))
            err = pred / cells.loss[held] - 1
            entry["parametric"] = {"d_kind": d_kind, "mean_abs_rel_error": float(np.mean(np.abs(err))),
                                   "max_abs_rel_error": float(np.max(np.abs(err)))}
            if what == "largest budget" and d_kind == "tokens":
                kappa = float(np.median(rest.flops / (rest.n * rest.tokens)))
                entry["parametric"]["n_star"] = parametric_frontier(theta, kappa, budgets[-1])[0]
        if what == "largest budget":
            measured = next((p for p in profiles["profiles"] if p["budget"] == budgets[-1]), {})
            entry["measured_n_star"] = measured.get("n_star") if measured.get("informative") else None
            known = [(p["budget"], p["n_star"]) for p in profiles["profiles"]
                     if p["informative"] and p["budget"] != budgets[-1]]
            if len(known) >= 2:  # the profile frontier through the smaller budgets, extrapolated
                b0, a = power_line(np.log([c for c, _ in known]), np.log([n for _, n in known]))
                entry["profile_n_star"] = math.exp(b0 + a * math.log(budgets[-1]))
        checks.append(entry)
    return checks


# ---------------------------------------------------------------------------------------------- the analysis

def d_kinds(cells: Cells) -> list[str]:
    """The D kinds the parametric law can be fitted on here: those with >= 3 values (tokens first)."""
    return [k for k in ("tokens", "transitions") if np.unique(cells.d(k)).size >= 3 and np.unique(cells.n).size >= 3]


def analyse(csv_path: Path, loss: str = "best_val_loss", n_boot: int = 200, seed: int = 0,
            plan_budget: float | None = None, forecast_at: tuple[float, float] | None = None) -> dict:
    """The whole analysis as a dict (see the module docstring); nothing is written."""
    rows = read_results(csv_path)
    if loss not in rows[0]:
        raise ValueError(f"{csv_path}: no column '{loss}' (the loss to analyse); has {sorted(rows[0])}")
    families, n_col = load_cells(rows, loss)
    if not families:
        raise ValueError(f"{csv_path}: no row has a finite '{loss}', FLOPs and tokens")
    rng = np.random.default_rng(seed)
    result = {"source": str(csv_path), "loss": loss, "model_size_column": n_col, "boot": n_boot, "seed": seed,
              "confidence": CONFIDENCE, "families": {}}
    for cells in families:
        iso = isoflop_analysis(cells, n_boot, rng)
        kinds = d_kinds(cells)
        parametric = {k: parametric_analysis(cells, k, n_boot, rng) for k in kinds}
        epochs = cells.tokens / (TOKENS_PER_STEP * cells.transitions)
        fam = {"cells": int(cells.n.size), "sizes": sorted(set(cells.n.tolist())),
               "budgets": sorted(set(cells.budget.tolist())),
               "epochs_range": [float(epochs.min()), float(epochs.max())],
               "isoflop": iso, "parametric": parametric,
               "leave_largest_out": leave_largest_out(cells, kinds[0] if kinds else None, iso)}
        if plan_budget:
            fam["plan"] = plan(fam, rows, cells, plan_budget)
        if forecast_at:
            fam["forecast"] = {k: forecast(p, *forecast_at) for k, p in parametric.items()}
        result["families"][cells.family] = fam
    return result


def plan(fam: dict, rows: list[dict], cells: Cells, budget: float) -> dict:
    """N*(C), D*(C) at `budget` from each informative method, and a next grid around the predicted optimum."""
    out: dict = {"budget": budget, "methods": {}}
    frontier = fam["isoflop"]["frontier"]
    if frontier["informative"]:
        out["methods"]["isoFLOP profiles"] = profile_frontier_at(frontier, budget)
    tokens_fit = fam["parametric"].get("tokens")
    if tokens_fit and tokens_fit["informative"]:
        out["methods"]["parametric"] = parametric_at(tokens_fit, budget)
    if not out["methods"]:
        out["reason"] = "no informative fit: the grid does not say where the optimum is"
        return out
    centre = next(iter(out["methods"].values()))["n_star"]
    sizes = {}
    for r in rows:
        if r["family"] == cells.family:
            sizes.setdefault(r["size"], float(r.get("non_embedding_params") or r["params"]))
    targets = [centre * f for f in NEXT_GRID_SPAN]
    nearest = sorted({min(sizes, key=lambda s: abs(math.log(sizes[s] / t))) for t in targets}, key=sizes.get)
    fpt = fam["isoflop"]["flops_per_token"]
    out["next_grid"] = {
        "centre_method": next(iter(out["methods"])), "n_targets": targets,
        "sizes": nearest, "size_n": [sizes[s] for s in nearest],
        "beyond_presets": centre > 2 * max(sizes.values()) or centre < 0.5 * min(sizes.values()),
        "flops_budgets": [budget / 2, budget, budget * 2],
        "tokens_at_budget": [budget / math.exp(fpt["log_coef"] + fpt["exponent"] * math.log(n)) for n in targets]}
    return out


# ---------------------------------------------------------------------------------------------- Markdown

def _num(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _ci(ci: list[float]) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def summary_markdown(result: dict) -> str:
    lines = [f"# Compute-optimal analysis of `{result['source']}`", "",
             f"Loss: `{result['loss']}`; N: `{result['model_size_column']}`; C: training FLOPs; intervals: "
             f"{100 * result['confidence']:.0f}% percentile bootstrap over the cells' seeds ({result['boot']} "
             f"replicates, RNG seed {result['seed']}). A fit that its intervals do not pin down is reported as "
             "*not informative* with the reason, not as a number.", ""]
    for family, fam in result["families"].items():
        lo, hi = fam["epochs_range"]
        lines += [f"## {family}", "",
                  f"{fam['cells']} cells, {len(fam['sizes'])} model sizes, {len(fam['budgets'])} FLOP budgets. "
                  f"What D is: tokens trained = 3 per timestep; these cells passed over their unique transitions "
                  f"{lo:.2g}–{hi:.2g} times" + (" (D in tokens and in unique transitions differ)" if hi > 1.05 or
                                                 lo < 0.95 else "") + ".", "",
                  "### isoFLOP profiles (method: parabola of log L in log N per budget)", "",
                  "| budget C (FLOPs) | cells | sizes | N*(C) | 95% interval | D*(C) tokens | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for p in fam["isoflop"]["profiles"]:
            if p["informative"]:
                lines.append(f"| {p['budget']:.3g} | {p['cells']} | {p['sizes']} | {_num(p['n_star'])} | "
                             f"{_ci(p['n_star_ci'])} | {_num(p['d_star_tokens'])} | informative |")
            else:
                lines.append(f"| {p['budget']:.3g} | {p['cells']} | {p['sizes']} | — | — | — | "
                             f"not informative: {p['reason']} |")
        lines += ["", "### Frontier N*(C) ∝ C^a, D*(C) ∝ C^b", ""]
        front = fam["isoflop"]["frontier"]
        lines.append(f"- from isoFLOP profiles: " + (
            f"a = {front['a']:.3f} {_ci(front['a_ci'])}, b = {front['b']:.3f} {_ci(front['b_ci'])} "
            f"(D in tokens; {len(front['budgets'])} budgets)" if front["informative"]
            else f"not informative ({front['reason']})"))
        tokens_fit = fam["parametric"].get("tokens")
        if tokens_fit:
            lines.append(f"- from the parametric L(N, D): " + (
                f"a = β/(α+β) = {tokens_fit['a']:.3f} {_ci(tokens_fit['a_ci'])}, b = α/(α+β) = "
                f"{tokens_fit['b']:.3f} {_ci(tokens_fit['b_ci'])} (C = κ·N·D, κ = {tokens_fit['kappa']:.3g})"
                if tokens_fit["informative"] else f"not informative ({tokens_fit['reason']})"))
        else:
            lines.append("- from the parametric L(N, D): not fitted with D = tokens (fewer than 3 values of N or of "
                         "tokens trained)")
        lines += ["", "### Parametric L(N, D) = E + A/N^α + B/D^β (Huber δ = 1e-3 on log residuals, L-BFGS-B)", ""]
        if not fam["parametric"]:
            lines.append("Not fitted: the grid needs >= 3 model sizes and >= 3 values of D (tokens or transitions).")
        for kind, fit in fam["parametric"].items():
            ci = fit["ci"]
            what = "tokens trained" if kind == "tokens" else "unique transitions of the subset"
            if fit["informative"]:
                lines.append(f"- D = {what}: E = {fit['E']:.4g} {_ci(ci['E'])}, α = {fit['alpha']:.3f} "
                             f"{_ci(ci['alpha'])}, β = {fit['beta']:.3f} {_ci(ci['beta'])}, A = {fit['A']:.3g}, "
                             f"B = {fit['B']:.3g}; R²(log L) = {fit['r2_log']:.2f}, {fit['cells']} cells")
            else:
                lines.append(f"- D = {what}: not informative ({fit['reason']}); α interval {_ci(ci['alpha'])}, "
                             f"β interval {_ci(ci['beta'])}")
        lines += ["", "### Leave-largest-out", "",
                  "| left out | cells | parametric: mean / max error of the held-out losses | N*(C) measured | "
                  "N*(C) predicted (profiles / parametric) |", "|---|---|---|---|---|"]
        for chk in fam["leave_largest_out"]:
            par = chk.get("parametric")
            err = (f"{100 * par['mean_abs_rel_error']:.1f}% / {100 * par['max_abs_rel_error']:.1f}% "
                   f"(D = {par['d_kind']})" if par else "not fitted")
            lines.append(f"| {chk['left_out']} | {chk['cells']} | {err} | {_num(chk.get('measured_n_star'))} | "
                         f"{_num(chk.get('profile_n_star'))} / {_num((par or {}).get('n_star'))} |")
        lines += _plan_lines(fam) + _forecast_lines(fam) + [""]
    lines += ["Figures: `isoflop.png` (profiles with bands), `frontier.png` (N*(C), D*(C) with bands).", ""]
    return "\n".join(lines)


def _plan_lines(fam: dict) -> list[str]:
    if "plan" not in fam:
        return []
    p = fam["plan"]
    lines = ["", f"### Plan for C = {p['budget']:.3g} FLOPs", ""]
    if "reason" in p:
        return lines + [f"No plan: {p['reason']}."]
    for method, m in p["methods"].items():
        lines.append(f"- {method}: N* = {_num(m['n_star'])} {_ci(m['n_star_ci'])}, D* = "
                     f"{_num(m['d_star_tokens'])} tokens {_ci(m['d_star_tokens_ci'])}")
    g = p["next_grid"]
    lines += ["", f"Next grid around N* (from {g['centre_method']}): sizes {', '.join(g['sizes'])} "
              f"(N = {', '.join(_num(n) for n in g['size_n'])})"
              + (" — the optimum lies beyond the presets of this grid; add sizes" if g["beyond_presets"] else "")
              + ":", "", "```yaml", "step_rule: isoflop",
              f"flops_budgets: [{', '.join(f'{c:.3g}' for c in g['flops_budgets'])}]",
              f"sizes: [{', '.join(g['sizes'])}]", "```"]
    return lines


def _forecast_lines(fam: dict) -> list[str]:
    if "forecast" not in fam:
        return []
    lines = ["", "### Forecast", ""]
    for kind, f in fam["forecast"].items():
        head = f"- L(N = {f['n']:.3g}, D = {f['d']:.3g} {kind}) "
        lines.append(head + (f"= {f['loss']:.4g} {_ci(f['loss_ci'])}" if f["informative"]
                             else f"not informative ({f['reason']})"))
    return lines or lines + ["No parametric fit to forecast from."]


def write_outputs(result: dict, out: Path, cells: list[Cells]) -> list[Path]:
    """compute_optimal.json / .md and the figures, atomically."""
    from mambadm.study.figures_compute import frontier_figure, isoflop_figure

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compute_optimal.json", out / "compute_optimal.md", out / "isoflop.png", out / "frontier.png"]
    slim = json.loads(json.dumps(result, default=float))
    for fam in slim["families"].values():  # bootstrap replicates stay in memory; the JSON keeps the intervals
        fam["isoflop"]["frontier"].pop("boot", None)
        for fit in fam["parametric"].values():
            fit.pop("boot", None)
    atomic_write_text(paths[0], json.dumps(slim, indent=2) + "\n")
    atomic_write_text(paths[1], summary_markdown(result))
    isoflop_figure(result, cells, paths[2])
    frontier_figure(result, paths[3])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.csv written by mambadm.grid")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's folder)")
    parser.add_argument("--loss", default="best_val_loss", help="loss column (best_val_loss or final_val_loss)")
    parser.add_argument("--boot", type=int, default=200, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    parser.add_argument("--forecast", nargs=2, type=float, metavar=("N", "D"),
                        help="predicted loss at model size N and D (in each fitted D kind) with its interval")
    parser.add_argument("--plan", type=float, metavar="BUDGET", help="N*, D* at this FLOP budget and a next grid")
    parser.add_argument("--no-report", action="store_true", help="do not write report.md / report.html")
    args = parser.parse_args(argv)
    if args.boot < 10:
        parser.error("--boot must be >= 10 (the intervals are percentiles over the replicates)")
    out = args.out or args.results.parent
    try:
        result = analyse(args.results, args.loss, args.boot, args.seed, args.plan,
                         tuple(args.forecast) if args.forecast else None)
        families, _ = load_cells(read_results(args.results), args.loss)
    except (FileNotFoundError, ValueError) as e:
        print(f"compute_optimal: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(result, out, families)
    print(summary_markdown(result))
    if not args.no_report:
        from mambadm.study.report import write_report

        paths += write_report(out, analysis_command=["python -m mambadm.study.compute_optimal",
                                                     *(argv if argv is not None else sys.argv[1:])])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

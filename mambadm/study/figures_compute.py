"""Figures of the compute-optimal analysis and the study report: isoFLOP profiles, the frontier, learning curves.

The field's conventions: log axes, one colour per family (shades of it for the budgets or model sizes), intervals
as bands.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mambadm.study.plots import FAMILY_COLORS, FAMILY_LABELS, save_figure  # (selects the Agg backend)

import matplotlib.pyplot as plt  # noqa: E402

FAMILY_CMAPS = {"mambadm": "Blues", "dt": "Oranges"}  # the shades of plots.FAMILY_COLORS


def shades(family: str, n: int) -> list:
    """`n` shades of the family's colour, light to dark."""
    cmap = plt.get_cmap(FAMILY_CMAPS.get(family, "Greys"))
    return [cmap(v) for v in np.linspace(0.45, 0.95, max(n, 1))]


def _label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def isoflop_figure(result: dict, cells: list, path: Path) -> None:
    """One panel per family: loss vs N at each budget (points), the fitted parabola with its band, N*(C) marked."""
    families = list(result["families"])
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(6.5 * max(1, len(families)), 4.8), squeeze=False)
    by_family = {c.family: c for c in cells}
    for ax, family in zip(axes[0], families):
        profiles = result["families"][family]["isoflop"]["profiles"]
        colours = shades(family, len(profiles))
        data = by_family.get(family)
        for colour, p in zip(colours, profiles):
            label = f"C = {p['budget']:.2g}"
            if data is not None:
                at = data.budget == p["budget"]
                ax.scatter(data.n[at], data.loss[at], color=colour, s=18, zorder=3)
            if "curve" in p:
                curve = p["curve"]
                ax.plot(curve["n"], curve["loss"], color=colour, label=label + ("" if p["informative"] else
                                                                                " (not informative)"))
                ax.fill_between(curve["n"], curve["lo"], curve["hi"], color=colour, alpha=0.2, lw=0)
            if p["informative"]:
                y = min(curve["loss"])
                ax.errorbar([p["n_star"]], [y], xerr=[[p["n_star"] - p["n_star_ci"][0]],
                                                      [p["n_star_ci"][1] - p["n_star"]]],
                            fmt="*", ms=11, color=colour, mec="black", capsize=3, zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model size N (parameters)")
        ax.set_ylabel(result["loss"].replace("_", " "))
        ax.set_title(f"{_label(family)}: isoFLOP profiles (★ N*(C) with its 95% interval)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _frontier_lines(fam: dict) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """(method, C grid, {n_star, n_lo, n_hi, d_star, d_lo, d_hi}) for each informative frontier of a family."""
    from mambadm.study.compute_optimal import parametric_at, profile_frontier_at

    grid = np.geomspace(min(fam["budgets"]) / 2, max(fam["budgets"]) * 4, 30)
    sources = []
    front = fam["isoflop"]["frontier"]
    if front["informative"]:
        sources.append(("isoFLOP profiles", lambda c: profile_frontier_at(front, c)))
    tokens_fit = fam["parametric"].get("tokens")
    if tokens_fit and tokens_fit["informative"]:
        sources.append(("parametric", lambda c: parametric_at(tokens_fit, c)))
    out = []
    for method, at in sources:
        points = [at(c) for c in grid]
        lines = {}
        for name, key in (("n", "n_star"), ("d", "d_star_tokens")):
            lines[f"{name}_star"] = np.array([p[key] for p in points])
            lines[f"{name}_lo"] = np.array([p[f"{key}_ci"][0] for p in points])
            lines[f"{name}_hi"] = np.array([p[f"{key}_ci"][1] for p in points])
        out.append((method, grid, lines))
    return out


def frontier_figure(result: dict, path: Path) -> None:
    """N*(C) (left) and D*(C) in tokens (right), log-log: the profiles' optima with intervals and each informative
    frontier as a line with its band (solid: isoFLOP profiles, dashed: parametric)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"isoFLOP profiles": "-", "parametric": "--"}
    for family, fam in result["families"].items():
        colour = FAMILY_COLORS.get(family, "tab:gray")
        for p in fam["isoflop"]["profiles"]:
            if p["informative"]:
                axes[0].errorbar([p["budget"]], [p["n_star"]],
                                 yerr=[[p["n_star"] - p["n_star_ci"][0]], [p["n_star_ci"][1] - p["n_star"]]],
                                 fmt="o", color=colour, capsize=3)
                axes[1].scatter([p["budget"]], [p["d_star_tokens"]], color=colour)
        for method, c, lines in _frontier_lines(fam):
            for ax, name in ((axes[0], "n"), (axes[1], "d")):
                ax.plot(c, lines[f"{name}_star"], styles[method], color=colour, label=f"{_label(family)}, {method}")
                ax.fill_between(c, lines[f"{name}_lo"], lines[f"{name}_hi"], color=colour, alpha=0.15, lw=0)
    for ax, what in ((axes[0], "N*(C): compute-optimal model size"), (axes[1], "D*(C): compute-optimal tokens")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no informative frontier", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    save_figure(fig, path)


def learning_curves_figure(curves: list[dict[str, Any]], path: Path) -> None:
    """Validation loss vs training FLOPs of every cell, one panel per family, shaded by model size (darker =
    bigger); the dotted line is the lowest loss reached at each FLOP count (Hoffmann et al.'s envelope)."""
    families = sorted({c["family"] for c in curves}) or [""]
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.8), squeeze=False)
    for ax, family in zip(axes[0], families):
        mine = [c for c in curves if c["family"] == family]
        sizes = sorted({c["n"] for c in mine})
        colours = dict(zip(sizes, shades(family, len(sizes))))
        labelled = set()
        for c in mine:
            x, y = np.asarray(c["flops"], dtype=float), np.asarray(c["val_loss"], dtype=float)
            ok = (x > 0) & np.isfinite(y) & (y > 0)
            label = None if c["n"] in labelled else f"{c['size']} (N = {c['n']:.3g})"
            labelled.add(c["n"])
            ax.plot(x[ok], y[ok], "-", color=colours[c["n"]], lw=1, alpha=0.8, label=label)
        points = sorted((x, y) for c in mine for x, y in zip(c["flops"], c["val_loss"])
                        if x > 0 and math.isfinite(y) and y > 0)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, np.minimum.accumulate(ys), ":", color="black", lw=1, label="lowest loss so far")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{_label(family)}: learning curves of {len(mine)} cells")
        ax.grid(True, which="both", alpha=0.3)
        if mine:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)

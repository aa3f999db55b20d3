"""PNG figures of the analyses (matplotlib, Agg backend), written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from data_pipeline.atomic import atomic_path  # noqa: E402

FAMILY_COLORS = {"mambadm": "tab:blue", "dt": "tab:orange"}
FAMILY_LABELS = {"mambadm": "MambaDM", "dt": "DT"}
LINESTYLES = ("-", "--", ":", "-.")


def save_figure(fig: Any, path: Path) -> None:
    """Saves `fig` as PNG atomically and closes it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def _color(family: str) -> str:
    return FAMILY_COLORS.get(family, "tab:gray")


def _panel(ax: Any, points: list, fits: list[dict], axis: str, ylabel: str, xlabel: str) -> None:
    """Seed-mean ± spread per grid point, one series per (family, other-axis value), with the fitted power law."""
    other = "d" if axis == "n" else "n"
    fit_by_key = {(f["family"], f[f"fixed_{other}"]): f for f in fits}
    series: dict[tuple, list] = {}
    for p in points:
        if p.values:
            series.setdefault((p.family, getattr(p, other)), []).append(p)
    for (family, fixed), pts in sorted(series.items()):
        pts = sorted(pts, key=lambda p: getattr(p, axis))
        x = np.array([getattr(p, axis) for p in pts])
        rank = sorted(k[1] for k in series if k[0] == family).index(fixed)  # smallest other-axis value: solid
        style = LINESTYLES[rank % len(LINESTYLES)]
        other_name = "D" if other == "d" else "N"
        label = f"{FAMILY_LABELS.get(family, family)}, {other_name}={fixed:,.3g}"
        ax.errorbar(x, [p.mean for p in pts], yerr=[p.spread for p in pts], fmt="o", color=_color(family),
                    capsize=3, ms=5, alpha=0.9)
        fit = fit_by_key.get((family, fixed))
        if fit and "error" not in fit:
            grid = np.geomspace(x.min(), x.max(), 50)
            ax.plot(grid, fit["coef"] * grid ** fit["exponent"], style, color=_color(family),
                    label=f"{label} (k={fit['exponent']:+.2f})")
        else:
            ax.plot(x, [p.mean for p in pts], style, color=_color(family), alpha=0.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def scaling_figure(score_pts: list, loss_pts: list, fits: dict, metric: str, n_col: str, path: Path) -> None:
    """2×2 figure: metric (top) and best validation loss (bottom) vs model size (left) and dataset size (right)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    n_label = "non-embedding parameters" if n_col == "non_embedding_params" else "parameters"
    _panel(axes[0, 0], score_pts, fits["metric_vs_n"], "n", metric, n_label)
    _panel(axes[0, 1], score_pts, fits["metric_vs_d"], "d", metric, "training transitions")
    _panel(axes[1, 0], loss_pts, fits["loss_vs_n"], "n", "best validation loss", n_label)
    _panel(axes[1, 1], loss_pts, fits["loss_vs_d"], "d", "best validation loss", "training transitions")
    for ax in axes[1]:
        ax.set_yscale("log")
    axes[0, 0].set_title(f"{metric} vs model size")
    axes[0, 1].set_title(f"{metric} vs dataset size")
    fig.suptitle("Scaling: MambaDM vs Decision Transformer (mean ± std over seeds; lines: power-law fits)")
    save_figure(fig, path)


def eigen_figure(branches: dict[str, dict[str, np.ndarray]], path: Path, threshold: float) -> None:
    """Per branch: histogram of the continuous eigenvalues' -Re λ(A) (left), exp(delta·A) in the complex plane with
    the unit circle (middle), and the histogram of |exp(delta·A)| (right)."""
    names = list(branches)
    fig, axes = plt.subplots(len(names), 3, figsize=(14, 3.6 * len(names)), squeeze=False)
    theta = np.linspace(0, 2 * np.pi, 256)
    for row, name in enumerate(names):
        cont, disc = branches[name]["continuous"].ravel(), branches[name]["discrete"].ravel()
        ax = axes[row, 0]
        ax.hist(np.log10(np.maximum(-cont.real, 1e-12)), bins=50, color="tab:blue", alpha=0.8)
        ax.set_title(f"{name}: continuous A ({cont.size} eigenvalues)")
        ax.set_xlabel("log10(-Re λ(A))")
        ax.set_ylabel("count")
        ax = axes[row, 1]
        ax.plot(np.cos(theta), np.sin(theta), color="gray", lw=0.8)
        ax.scatter(disc.real, disc.imag if np.iscomplexobj(disc) else np.zeros_like(disc.real), s=4, alpha=0.4,
                   color="tab:red")
        ax.set_aspect("equal")
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_title(f"{name}: exp(Δ·A) in the complex plane")
        ax.set_xlabel("Re")
        ax = axes[row, 2]
        ax.hist(np.abs(disc), bins=np.linspace(0, 1, 51), color="tab:red", alpha=0.8)
        ax.axvline(threshold, color="black", ls="--", lw=0.8)
        share = float(np.mean(np.abs(disc) > threshold))
        ax.set_title(f"{name}: |exp(Δ·A)|, {100 * share:.1f}% > {threshold}")
        ax.set_xlabel("|λ|")
        ax.set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path)

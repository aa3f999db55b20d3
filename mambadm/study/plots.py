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
    """Seed-mean ± error per grid point (Point.error: seeds, or episodes with one seed), one series per (family,
    other-axis value), with the fitted power law; the legend goes below the panel, where it covers no line."""
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
        ax.errorbar(x, [p.mean for p in pts], yerr=[p.error[0] for p in pts], fmt="o", color=_color(family),
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
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def scaling_figure(score_pts: list, loss_pts: list, fits: dict, metric: str, n_col: str, path: Path,
                   error_bars: str) -> None:
    """2×2 figure: metric (top) and best validation loss (bottom) vs model size (left) and dataset size (right);
    `error_bars` (what the bars show) is the caption."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 10), layout="constrained")
    n_label = "non-embedding parameters" if n_col == "non_embedding_params" else "parameters"
    _panel(axes[0, 0], score_pts, fits["metric_vs_n"], "n", metric, n_label)
    _panel(axes[0, 1], score_pts, fits["metric_vs_d"], "d", metric, "training transitions")
    _panel(axes[1, 0], loss_pts, fits["loss_vs_n"], "n", "best validation loss", n_label)
    _panel(axes[1, 1], loss_pts, fits["loss_vs_d"], "d", "best validation loss", "training transitions")
    for ax in axes[1]:
        ax.set_yscale("log")
    axes[0, 0].set_title(f"{metric} vs model size")
    axes[0, 1].set_title(f"{metric} vs dataset size")
    fig.suptitle(f"Scaling: MambaDM vs Decision Transformer (lines: power-law fits)\n{error_bars}", fontsize=10)
    save_figure(fig, path)


def eigen_figure(branches: dict[str, dict[str, np.ndarray]], initial: dict[str, dict[str, np.ndarray]] | None,
                 path: Path, threshold: float) -> None:
    """Per branch: the histogram of log10|λ(A)| (left) and of |exp(Δ·A)| (middle), trained filled and the
    initialisation as an outline; right: each eigenvalue's trained |A| against its initial |A| (on the diagonal:
    unchanged). All eigenvalues are real and negative (A is real diagonal), so no complex-plane panel."""
    names = list(branches)
    cols = 3 if initial else 2
    fig, axes = plt.subplots(len(names), cols, figsize=(5 * cols, 3.6 * len(names)), squeeze=False,
                             layout="constrained")
    for row, name in enumerate(names):
        cont, disc = branches[name]["continuous"].ravel(), np.abs(branches[name]["discrete"].ravel())
        init = initial[name] if initial else None
        log_a = np.log10(np.maximum(-cont, 1e-12))
        bins = np.linspace(log_a.min(), log_a.max() + 1e-9, 51)
        ax = axes[row, 0]
        if init is not None:
            bins = np.linspace(min(log_a.min(), np.log10(-init["continuous"]).min()),
                               max(log_a.max(), np.log10(-init["continuous"]).max()) + 1e-9, 51)
            ax.hist(np.log10(-init["continuous"].ravel()), bins=bins, histtype="step", color="black", lw=1.2,
                    label="initialisation")
        ax.hist(log_a, bins=bins, color="tab:blue", alpha=0.6, label="trained")
        ax.set_title(f"{name}: continuous A ({cont.size} eigenvalues)")
        ax.set_xlabel("log10|λ(A)|")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        edges = np.linspace(0, 1, 51)
        if init is not None:
            ax.hist(np.abs(init["discrete"].ravel()), bins=edges, histtype="step", color="black", lw=1.2,
                    label=f"initialisation: {100 * np.mean(np.abs(init['discrete']) > threshold):.1f}% > {threshold}")
        ax.hist(disc, bins=edges, color="tab:red", alpha=0.6,
                label=f"trained: {100 * np.mean(disc > threshold):.1f}% > {threshold}")
        ax.axvline(threshold, color="black", ls="--", lw=0.8)
        ax.set_title(f"{name}: |exp(Δ·A)|")
        ax.set_xlabel("|λ|")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
        if init is not None:
            ax = axes[row, 2]
            a0 = -init["continuous"].ravel()
            ax.scatter(a0, -cont, s=3, alpha=0.4, color="tab:blue")
            lim = [min(a0.min(), -cont.max()), max(a0.max(), -cont.min())]
            ax.plot(lim, lim, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}: |A| trained vs initial")
            ax.set_xlabel("initial |λ(A)|")
            ax.set_ylabel("trained |λ(A)|")
    save_figure(fig, path)

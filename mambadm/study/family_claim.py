"""The paper's first claim, measured with an interval: MambaDM against DT at equal parameters.

Cao et al. (2024) report MambaDM above DT on Atari and D4RL. A grid that trains both families at the parameter-matched
size presets (`python -m mambadm.model.sizes`: a preset name is one pair) answers it per grid point (size preset,
dataset size): the relative difference of the seed means, (MambaDM - DT) / |DT|, signed so that positive favours
MambaDM (a higher score, or a lower validation loss), averaged over the grid points both families ran. The interval
(95%, percentile bootstrap) resamples each point's seeds, or draws from its evaluation episodes' spread with one seed
(`claim.point_draws`). The verdict follows from that interval only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mambadm.study.claim import CONFIDENCE, _ci, _pct, _pct_ci, point_draws

FAMILIES = ("mambadm", "dt")


def matched_points(points: list[Any]) -> list[tuple[Any, Any]]:
    """(MambaDM point, DT point) pairs at the same size preset and dataset size, both with values."""
    by_key = {(p.family, p.size, p.d): p for p in points if p.values}
    pairs = [(p, by_key[("dt", size, d)]) for (family, size, d), p in by_key.items()
             if family == "mambadm" and ("dt", size, d) in by_key]
    return sorted(pairs, key=lambda pair: (pair[0].n, pair[0].d))


def family_check(points: list[Any], higher_is_better: bool, n_draws: int = 1000, seed: int = 0) -> dict:
    """Mean advantage of MambaDM over DT at matched points, per size preset and overall, with intervals."""
    pairs = matched_points(points)
    if not pairs:
        return {"pairs": [], "verdict": "not answered: no grid point has both families", "answered": False}
    rng = np.random.default_rng(seed)
    sign = 1.0 if higher_is_better else -1.0
    draws, sources = [], set()
    rows = []
    for m, d in pairs:
        (dm, sm), (dd, sd) = point_draws(m, n_draws, rng), point_draws(d, n_draws, rng)
        sources |= {sm, sd}
        draws.append(sign * (dm - dd) / np.abs(dd))
        rows.append({"size": m.size, "transitions": m.d, "n_mambadm": m.n, "n_dt": d.n, "mambadm": m.mean,
                     "dt": d.mean, "advantage": sign * (m.mean - d.mean) / abs(d.mean),
                     "ci": None if "none" in (sm, sd) else _ci(draws[-1])})  # no spread, no interval
    mean_draws = np.mean(draws, axis=0)
    entry = {"pairs": rows, "advantage": float(np.mean([r["advantage"] for r in rows])), "ci": _ci(mean_draws),
             "spread_from": "none" if "none" in sources else "+".join(sorted(sources)),
             "higher_is_better": higher_is_better}
    lo, hi = entry["ci"]
    if entry["spread_from"] == "none":
        entry["verdict"], entry["answered"] = "not answered: no spread to tell noise from an effect", False
    elif lo > 0:
        entry["verdict"], entry["answered"] = "MambaDM ahead (interval above zero)", True
    elif hi < 0:
        entry["verdict"], entry["answered"] = "DT ahead (interval below zero)", True
    else:
        entry["verdict"], entry["answered"] = f"not answered: the interval [{_pct(lo)}, {_pct(hi)}] spans zero", False
    return entry


def family_markdown(checks: dict[str, dict], domain: str) -> list[str]:
    """The section of scaling.md: one table per measure (score, validation loss), one row per matched grid point."""
    lines = ["## The paper's claim: MambaDM vs DT at equal parameters", "",
             f"Cao et al. (2024) report MambaDM above DT. This grid measures {domain}: per parameter-matched size "
             f"preset and dataset size, (MambaDM − DT) / |DT| of the seed means, positive when MambaDM is better "
             f"(higher score, lower loss); the mean over the grid points with its {100 * CONFIDENCE:.0f}% interval.",
             ""]
    for measure, check in checks.items():
        if not check["pairs"]:
            lines += [f"- {measure}: {check['verdict']}", ""]
            continue
        lines += [f"**{measure}**: MambaDM's advantage {_pct(check['advantage'])}{_pct_ci(check['ci'])} "
                  f"(spread from {check['spread_from']}) — {check['verdict']}.", "",
                  "| size | transitions | N MambaDM / DT | MambaDM | DT | advantage [CI] |",
                  "|---|---|---|---|---|---|"]
        for r in check["pairs"]:
            lines.append(f"| {r['size']} | {r['transitions']:,.0f} | {r['n_mambadm']:,.0f} / {r['n_dt']:,.0f} | "
                         f"{r['mambadm']:.4g} | {r['dt']:.4g} | {_pct(r['advantage'])}{_pct_ci(r['ci'])} |")
        lines.append("")
    return lines

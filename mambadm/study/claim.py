"""The paper's claim, measured with an interval: does 2x data help more than a bigger model?

Cao et al. (2024) report that 2x data improves Atari scores by up to 33.7% while larger models do not help. Per
family we take the relative change of the seed-mean score over every data step (neighbouring dataset sizes, the
model fixed) and every model step (neighbouring model sizes, the data fixed), and their means. The interval (95%,
percentile bootstrap) comes from resampling each grid point's mean:
- several seeds: the seeds are resampled (the seed mean of a resample);
- one seed: the mean is drawn from N(mean, stderr) with stderr = score std / sqrt(episodes), the evaluation
  episodes' own spread; a cell without an episode spread (one episode, or an older results.csv) has none.
The verdict follows from those intervals only: "agrees" / "partly" / "disagrees" when they exclude zero, "not
answered" when an interval spans zero, a step is missing, or nothing can be resampled.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

PAPER_DATA_GAIN = 0.337  # "2x data improves Atari scores by up to 33.7%" (Cao et al. 2024)
NO_MODEL_GAIN = 0.05  # a bigger model "does not help" when its gain's interval stays below +5%
CONFIDENCE = 0.95


def domain_words(env_kind: str, env: str) -> str:
    """How the grid's scores are named: an Atari game's scores or a MuJoCo task's returns."""
    if env_kind == "atari":
        return f"Atari scores on {env}"
    if env_kind == "mujoco":
        return f"returns on the MuJoCo task {env}"
    return f"scores on {env}" if env else "scores (the results.csv names no environment)"


def point_draws(point: Any, n_draws: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(n_draws resampled means of one grid point, where the spread comes from: seeds | episodes | none)."""
    values = np.asarray(point.values, dtype=float)
    if values.size > 1:
        return values[rng.integers(0, values.size, size=(n_draws, values.size))].mean(axis=1), "seeds"
    sem = point.sems[0] if point.sems else float("nan")
    if values.size == 1 and math.isfinite(sem) and sem > 0:
        return values[0] + sem * rng.standard_normal(n_draws), "episodes"
    return np.full(n_draws, point.mean), "none"


def steps_along(points: list[Any], axis: str) -> list[tuple[Any, Any]]:
    """Neighbouring pairs (smaller, bigger) along `axis` ('n' or 'd'), the other axis and the family fixed."""
    other = "d" if axis == "n" else "n"
    lines: dict[tuple, list] = {}
    for p in points:
        if p.values:
            lines.setdefault((p.family, getattr(p, other)), []).append(p)
    pairs = []
    for key in sorted(lines):
        pts = sorted(lines[key], key=lambda p: getattr(p, axis))
        pairs += [(a, b) for a, b in zip(pts, pts[1:]) if a.mean != 0]
    return pairs


def _ci(samples: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return [float(lo), float(hi)]


def _step_rows(pairs: list[tuple[Any, Any]], axis: str) -> list[dict]:
    other = "d" if axis == "n" else "n"
    return [{"family": a.family, f"fixed_{other}": getattr(a, other), "from": getattr(a, axis),
             "to": getattr(b, axis), "from_size": a.size, "to_size": b.size,
             "ratio": getattr(b, axis) / getattr(a, axis), "gain": (b.mean - a.mean) / abs(a.mean)} for a, b in pairs]


def verdict(entry: dict) -> tuple[str, bool]:
    """(the sentence, whether the data answer the question) from the gains and their intervals."""
    if entry["data_gain_mean"] is None or entry["model_gain_mean"] is None:
        missing = "data" if entry["data_gain_mean"] is None else "model"
        return f"not answered: the grid has no {missing} step", False
    if entry["spread_from"] == "none":
        return "not answered: one seed and no episode spread, so noise cannot be told from an effect", False
    (dlo, dhi), (xlo, xhi), (mlo, mhi) = entry["data_gain_ci"], entry["difference_ci"], entry["model_gain_ci"]
    if dhi < 0:
        return f"disagrees: more data hurt ({_pct(entry['data_gain_mean'])}, interval below zero)", True
    if xhi < 0:
        return "disagrees: a bigger model helped more than more data (interval of the difference below zero)", True
    if dlo > 0 and xlo > 0:
        if mhi <= NO_MODEL_GAIN:
            return "agrees: more data helps, more than a bigger model, which gains ~nothing", True
        if mlo > 0:
            return "partly: more data helps more than a bigger model, but bigger models help too", True
        return (f"agrees that more data helps more than a bigger model; whether a bigger model helps is not answered "
                f"(its interval [{_pct(mlo)}, {_pct(mhi)}] spans zero and reaches past +{NO_MODEL_GAIN:.0%})"), True
    spans = "the data gain's" if dlo <= 0 else "the difference's"
    lo, hi = entry["data_gain_ci"] if dlo <= 0 else entry["difference_ci"]
    return f"not answered: {spans} interval [{_pct(lo)}, {_pct(hi)}] spans zero", False


def claim_check(points: list[Any], n_draws: int = 1000, seed: int = 0) -> dict:
    """Per family: the mean data-step and model-step gains, their intervals, the interval of (data - model) and a
    verdict computed from exactly these numbers."""
    data_pairs, model_pairs = steps_along(points, "d"), steps_along(points, "n")
    rng = np.random.default_rng(seed)
    draws, sources = {}, {}
    for p in points:
        if p.values:
            draws[id(p)], sources[id(p)] = point_draws(p, n_draws, rng)

    def gains(pairs: list) -> np.ndarray:  # (n_draws,) mean relative gain over the pairs
        return np.mean([(draws[id(b)] - draws[id(a)]) / np.abs(draws[id(a)]) for a, b in pairs], axis=0)

    summary = {}
    for family in sorted({p.family for p in points}):
        dp = [(a, b) for a, b in data_pairs if a.family == family]
        mp = [(a, b) for a, b in model_pairs if a.family == family]
        used = {sources[id(p)] for pair in dp + mp for p in pair}
        entry: dict[str, Any] = {"spread_from": "none" if "none" in used or not used else "+".join(sorted(used))}
        for name, pairs in (("data", dp), ("model", mp)):
            point = [(b.mean - a.mean) / abs(a.mean) for a, b in pairs]
            entry[f"{name}_gain_mean"] = float(np.mean(point)) if point else None
            entry[f"{name}_gain_max"] = float(max(point)) if point else None
            entry[f"{name}_gain_ci"] = _ci(gains(pairs)) if pairs else None
        if dp and mp:
            entry["difference"] = entry["data_gain_mean"] - entry["model_gain_mean"]
            entry["difference_ci"] = _ci(gains(dp) - gains(mp))
            entry["data_beats_model"] = bool(entry["difference"] > 0)
        entry["verdict"], entry["answered"] = verdict(entry)
        summary[family] = entry
    return {"data_steps": _step_rows(data_pairs, "d"), "model_steps": _step_rows(model_pairs, "n"),
            "per_family": summary, "paper_data_gain_max": PAPER_DATA_GAIN, "confidence": CONFIDENCE}


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.1f}%"


def _pct_ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{_pct(ci[0])}, {_pct(ci[1])}]"


def claim_markdown(claim: dict, domain: str) -> list[str]:
    """The claim section of scaling.md: the paper's statement, this grid's numbers with intervals, the verdicts."""
    lines = ["## The paper's claim: 2× data vs a bigger model", "",
             f"Cao et al. (2024) report that 2× data improves Atari scores by up to {100 * PAPER_DATA_GAIN:.1f}% "
             f"while larger models do not help. This grid measures {domain}: the relative change of the seed-mean "
             f"score between neighbouring grid sizes (the other axis fixed), mean over the steps with its "
             f"{100 * CONFIDENCE:.0f}% interval (spread from seeds, or from evaluation episodes with one seed).", "",
             "| family | data step: mean [CI] | data step: max | bigger model: mean [CI] | bigger model: max | "
             "data − model [CI] | spread from | verdict |", "|---|---|---|---|---|---|---|---|"]
    for fam, e in claim["per_family"].items():
        lines.append(f"| {fam} | {_pct(e['data_gain_mean'])}{_pct_ci(e['data_gain_ci'])} | "
                     f"{_pct(e['data_gain_max'])} | {_pct(e['model_gain_mean'])}{_pct_ci(e['model_gain_ci'])} | "
                     f"{_pct(e['model_gain_max'])} | {_pct(e.get('difference'))}{_pct_ci(e.get('difference_ci'))} | "
                     f"{e['spread_from']} | {e['verdict']} |")
    ratios = sorted({round(g["ratio"], 2) for g in claim["data_steps"]})
    lines += ["", f"Data steps in this grid multiply transitions by {ratios} (2× in the paper)."]
    return lines

"""Aggregating episode results per target: mean, std, stderr, normalised scores; the Markdown table."""
from __future__ import annotations

import math

import numpy as np

from evaluation.scores import env_name, normalized


def summarize(episodes: list[dict], targets: list[float], eval_env: dict) -> list[dict]:
    """One row per target. ``std`` is the sample standard deviation (ddof=1; 0 for one episode), ``stderr`` = std/√n;
    the normalised mean/stderr use the env's reference returns (None without one)."""
    rows = []
    for tg in targets:
        rets = np.array([e["return"] for e in episodes if e["target"] == tg], np.float64)
        n = len(rets)
        std = float(rets.std(ddof=1)) if n > 1 else 0.0
        mean = float(rets.mean()) if n else math.nan
        stderr = std / math.sqrt(n) if n else math.nan
        norm = normalized(eval_env, mean)
        norm_se = None if norm is None else abs(normalized(eval_env, mean + stderr) - norm)
        lengths = [e["length"] for e in episodes if e["target"] == tg]
        rows.append({"target": tg, "episodes": n, "mean": mean, "std": std, "stderr": stderr,
                     "min": float(rets.min()) if n else math.nan, "max": float(rets.max()) if n else math.nan,
                     "normalized_mean": norm, "normalized_stderr": norm_se,
                     "mean_length": float(np.mean(lengths)) if n else math.nan})
    return rows


def markdown_table(results: dict) -> str:
    name = env_name(results["env"])
    lines = [f"| env | target | episodes | return mean ± stderr | std | min | max | normalised ± stderr |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["targets"]:
        norm = "—" if r["normalized_mean"] is None else f"{r['normalized_mean']:.1f} ± {r['normalized_stderr']:.1f}"
        lines.append(f"| {name} | {r['target']:g} | {r['episodes']} | {r['mean']:.1f} ± {r['stderr']:.1f} | "
                     f"{r['std']:.1f} | {r['min']:.1f} | {r['max']:.1f} | {norm} |")
    return "\n".join(lines)

"""Shared by the compute-optimal tests: a results.csv of an isoFLOP grid whose losses follow a planted
L(N, D) = E + A/N^alpha + B/D^beta (D in tokens, C = 6 N D) with log-normal noise, or a flat loss."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

E, A, ALPHA, B, BETA, KAPPA = 1.0, 60.0, 0.34, 300.0, 0.28, 6.0
SIZES = tuple(np.geomspace(3e3, 3e5, 6))
BUDGETS = (1e12, 4e12, 1.6e13, 6.4e13)
COLUMNS = ("cell", "family", "size", "seed", "params", "non_embedding_params", "transitions", "steps", "tokens",
           "flops", "final_val_loss", "best_val_loss", "score_mean")


def planted_loss(n, d):
    return E + A / np.asarray(n) ** ALPHA + B / np.asarray(d) ** BETA


def planted_n_star(budget: float) -> float:
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (budget / KAPPA) ** (BETA / (ALPHA + BETA))


def write_results(out: Path, noise: float = 0.01, seeds: int = 3, flat: bool = False, curves: bool = False,
                  families: tuple[str, ...] = ("mambadm",), rng_seed: int = 1) -> Path:
    """OUT/results.csv (and with `curves`, each cell's run/metrics.jsonl with a validation curve)."""
    rng = np.random.default_rng(rng_seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in families:
        for i, n in enumerate(SIZES):
            for budget in BUDGETS:
                d = budget / (KAPPA * n)
                for seed in range(seeds):
                    loss = (1.2 if flat else float(planted_loss(n, d))) * math.exp(noise * rng.standard_normal())
                    key = f"{family}-z{i}-t50000-c{budget:.3g}-s{seed}".replace("+", "")
                    rows.append({"cell": key, "family": family, "size": f"z{i}", "seed": seed, "params": 1.2 * n,
                                 "non_embedding_params": n, "transitions": 50000, "steps": 100, "tokens": d,
                                 "flops": budget, "final_val_loss": loss, "best_val_loss": loss, "score_mean": 1.0})
                    if curves:
                        run = out / "cells" / key / "run"
                        run.mkdir(parents=True, exist_ok=True)
                        fractions = np.linspace(0.1, 1, 5)
                        run.joinpath("metrics.jsonl").write_text("".join(
                            json.dumps({"step": int(100 * f), "val_loss": loss * (1 + 0.5 * (1 - f)),
                                        "flops": budget * f}) + "\n" for f in fractions))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out / "results.csv"

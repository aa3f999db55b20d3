"""The paper's eigenvalue claim across a study: do the global and local branches learn different memories?

    python -m mambadm.study.branch_claim results.csv [--out DIR] [--threshold 0.99]

Cao et al. (2024) read the eigenvalues of A in the global and the local Mamba of each GLoMa layer as two different
memories. One export answers nothing with an interval (`mambadm.study.eigen` draws and tabulates one); a grid's
MambaDM cells do: for every MambaDM export listed in results.csv (column `checkpoint`), per branch pooled over
layers, the share of |exp(Δ·A)| above the threshold (long memory; Δ = softplus(dt_bias)) and the median
|exp(Δ·A)|, trained and at the initialisation training started from (rebuilt as `mambadm.study.eigen` does). Per
cell the paired difference global − local; over cells its mean with a 95% percentile bootstrap interval
(cells resampled), for the trained model and for its change from the initialisation (what training did to each
branch). Writes branch_claim.md and branch_claim.json into DIR (default: the CSV's folder).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_write_text
from mambadm.study.claim import CONFIDENCE, _ci
from mambadm.study.eigen import eigenvalues, initial_model

BRANCHES = ("global", "local")


def branch_measures(model, threshold: float) -> dict[str, dict[str, float]]:
    """Per branch, pooled over layers: long-memory share and median |exp(ΔA)| with Δ from the dt bias."""
    pooled: dict[str, list[np.ndarray]] = {b: [] for b in BRANCHES}
    for entry in eigenvalues(model):
        if entry["branch"] in pooled:
            pooled[entry["branch"]].append(np.abs(entry["discrete"]).ravel())
    missing = [b for b, v in pooled.items() if not v]
    if missing:
        raise ValueError(f"the model has no {missing} Mamba branch (a GLoMa MambaDM is needed)")
    return {b: {"share_long": float(np.mean(np.concatenate(v) > threshold)),
                "median": float(np.median(np.concatenate(v)))} for b, v in pooled.items()}


def cell_measures(export: Path, threshold: float) -> dict:
    """Trained and initial branch measures of one export."""
    from mambadm.export import load_export

    model, cfg, spec, _ = load_export(export)
    return {"trained": branch_measures(model, threshold), "init": branch_measures(initial_model(cfg, spec), threshold)}


def summarise(cells: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean global − local differences over cells with bootstrap intervals, trained and change from init."""
    rng = np.random.default_rng(seed)
    out = {}
    for measure in ("share_long", "median"):
        trained = np.array([c["trained"]["global"][measure] - c["trained"]["local"][measure] for c in cells])
        moved = np.array([(c["trained"]["global"][measure] - c["init"]["global"][measure])
                          - (c["trained"]["local"][measure] - c["init"]["local"][measure]) for c in cells])
        for name, values in ((f"{measure}_global_minus_local", trained),
                             (f"{measure}_change_global_minus_local", moved)):
            boot = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
            ci = _ci(boot)
            out[name] = {"mean": float(values.mean()), "ci": ci, "cells": len(values),
                         "verdict": "global above local" if ci[0] > 0 else "local above global" if ci[1] < 0
                         else "not answered: the interval spans zero"}
    return out


def summary_markdown(result: dict) -> str:
    t = result["threshold"]
    lines = [f"# Global vs local eigenvalues across `{result['source']}`", "",
             f"{result['n_cells']} MambaDM exports; Δ = softplus(dt_bias); long memory: |exp(ΔA)| > {t}; "
             f"per cell global − local (pooled over layers), mean over cells with its {100 * CONFIDENCE:.0f}% "
             f"bootstrap interval (cells resampled).", "",
             "| measure | trained: global − local [CI] | verdict | change from init: global − local [CI] "
             "| verdict |",
             "|---|---|---|---|---|"]
    names = {"share_long": f"share above {t}", "median": "median of abs exp(ΔA)"}
    for m, label in names.items():
        a, b = result["summary"][f"{m}_global_minus_local"], result["summary"][f"{m}_change_global_minus_local"]
        lines.append(f"| {label} | {a['mean']:+.4f} [{a['ci'][0]:+.4f}, {a['ci'][1]:+.4f}] | {a['verdict']} | "
                     f"{b['mean']:+.4f} [{b['ci'][0]:+.4f}, {b['ci'][1]:+.4f}] | {b['verdict']} |")
    lines += ["", "| cell | global share (init) | local share (init) | global median | local median |",
              "|---|---|---|---|---|"]
    for c in result["cells"]:
        g, loc, gi, li = (c["trained"]["global"], c["trained"]["local"], c["init"]["global"], c["init"]["local"])
        lines.append(f"| {c['cell']} | {g['share_long']:.4f} ({gi['share_long']:.4f}) | {loc['share_long']:.4f} "
                     f"({li['share_long']:.4f}) | {g['median']:.4f} | {loc['median']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.csv written by mambadm.grid")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's folder)")
    parser.add_argument("--threshold", type=float, default=0.99, help="|exp(ΔA)| above this is long memory")
    args = parser.parse_args(argv)
    try:
        with args.results.open() as f:
            reader = csv.DictReader(f)
            missing = {"cell", "family", "checkpoint"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{args.results}: no column(s) {sorted(missing)} (a results.csv of mambadm.grid "
                                 f"has them)")
            rows = [r for r in reader if r["family"] == "mambadm"]
        if not rows:
            raise ValueError(f"{args.results}: no MambaDM rows")
        cells = []
        for r in rows:
            export = Path(r["checkpoint"])
            if not export.is_absolute():
                export = args.results.parent / export
            if not export.is_dir():
                raise FileNotFoundError(f"{args.results}: cell {r['cell']}: export {export} not found")
            cells.append({"cell": r["cell"], **cell_measures(export, args.threshold)})
    except (FileNotFoundError, ValueError) as e:
        print(f"branch_claim: {e}", file=sys.stderr)
        return 2
    result = {"source": str(args.results), "threshold": args.threshold, "n_cells": len(cells), "cells": cells,
              "summary": summarise(cells)}
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "branch_claim.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "branch_claim.md", summary_markdown(result))
    print(summary_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling analysis of a grid's results.csv: power laws of score and validation loss vs model and dataset size.

    python -m mambadm.study.scaling results.csv [--out DIR] [--metric score_mean] [--boot 1000]

Writes into DIR (default: the CSV's folder): `scaling.png` (score and validation loss vs parameters and vs
transitions, both families, like the paper's Figure 2), `scaling.json` (every fit with its bootstrap CI) and
`scaling.md` (warnings, the fits as tables and the check of the paper's claim that 2x data helps more than a
bigger model, with the interval its verdict follows from).

Model size is the non-embedding parameter count when the CSV has it (Kaplan et al.'s convention), else all
parameters; dataset size is the training subset's transitions (owned window starts).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_write_text
from mambadm.study.caveats import caveats
from mambadm.study.claim import claim_check, claim_markdown, domain_words
from mambadm.study.family_claim import family_check, family_markdown
from mambadm.study.fits import FitError, fit_joint, fit_power_law
from mambadm.study.plots import scaling_figure

NUMERIC = ("params", "non_embedding_params", "transitions", "steps", "tokens", "flops", "final_val_loss",
           "best_val_loss", "score_mean", "score_std", "normalized_mean", "normalized_std", "wall_time_s", "seed",
           "episodes", "truncated_share", "data_return_max", "val_settled_step")
REQUIRED = ("family", "size", "params", "transitions")


@dataclass
class Point:
    """Cells of one (family, model size, dataset size), seeds pooled; `sems` is each seed's standard error over
    its evaluation episodes (nan where unknown, e.g. for losses)."""

    family: str
    size: str
    n: float
    d: float
    values: list[float]
    sems: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def error(self) -> tuple[float, str]:
        """(error bar, its source): std over seeds; with one seed the episodes' standard error; else none."""
        if len(self.values) > 1:
            return float(np.std(self.values)), "seeds"
        if self.sems and math.isfinite(self.sems[0]):
            return self.sems[0], "episodes"
        return 0.0, "none"


def read_results(path: Path) -> list[dict]:
    """Rows of results.csv with numeric columns as floats (empty cells -> nan); checks the required columns."""
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        rows = []
        for i, raw in enumerate(reader, start=2):
            row = dict(raw)
            for c in NUMERIC:
                if c in row:
                    try:
                        row[c] = float(row[c]) if row[c] not in ("", None) else float("nan")
                    except ValueError:
                        raise ValueError(f"{path}:{i}: column '{c}' is not a number: {row[c]!r}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no result rows")
    return rows


def model_size_column(rows: list[dict]) -> str:
    ok = all(math.isfinite(r.get("non_embedding_params", float("nan"))) and r["non_embedding_params"] > 0
             for r in rows)
    return "non_embedding_params" if ok else "params"


def episode_sem(row: dict, metric: str) -> float:
    """Standard error of a score over the cell's evaluation episodes (`<x>_std` / sqrt(episodes)); nan if unknown."""
    std, episodes = row.get(metric.replace("_mean", "_std"), float("nan")), row.get("episodes", float("nan"))
    if not metric.endswith("_mean") or not isinstance(std, float) or not math.isfinite(episodes) or episodes < 2:
        return float("nan")
    return std / math.sqrt(episodes)


def group_points(rows: list[dict], metric: str, n_col: str) -> list[Point]:
    cells: dict[tuple, Point] = {}
    for r in rows:
        key = (r["family"], r["size"], r[n_col], r["transitions"])
        p = cells.setdefault(key, Point(r["family"], r["size"], r[n_col], r["transitions"], [], []))
        v = r.get(metric, float("nan"))
        if math.isfinite(v):
            p.values.append(v)
            p.sems.append(episode_sem(r, metric))
    return sorted(cells.values(), key=lambda p: (p.family, p.n, p.d))


def _fit_entry(x: list[float], y: list[float], n_boot: int) -> dict:
    try:
        fit = fit_power_law(x, y, n_boot=n_boot)
    except FitError as e:
        return {"error": str(e)}
    ci = fit.exponent_ci
    gain_ci = [2.0 ** ci[0] - 1, 2.0 ** ci[1] - 1] if ci else None
    return fit.to_dict() | {"gain_2x": fit.gain(2.0), "gain_2x_ci": gain_ci}


def _along(points: list[Point], axis: str) -> tuple[str, list[tuple[tuple, list[Point]]]]:
    """(the other axis, [((family, value of the other axis), points)] sorted): the lines along `axis` ('n' or 'd')."""
    other = "d" if axis == "n" else "n"
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        groups[(p.family, getattr(p, other))].append(p)
    return other, sorted(groups.items())


def power_law_fits(points: list[Point], axis: str, n_boot: int) -> list[dict]:
    """One fit per family and per value of the other axis: metric vs `axis` ('n' or 'd') over all seeds."""
    other, lines = _along(points, axis)
    fits = []
    for (family, fixed), pts in lines:
        x = [getattr(p, axis) for p in pts for _ in p.values]
        y = [v for p in pts for v in p.values]
        fits.append({"family": family, "vs": axis, f"fixed_{other}": fixed, **_fit_entry(x, y, n_boot)})
    return fits


def joint_fits(rows: list[dict], n_col: str, n_boot: int) -> dict:
    out = {}
    for family in sorted({r["family"] for r in rows}):
        sel = [r for r in rows if r["family"] == family and math.isfinite(r.get("best_val_loss", float("nan")))]
        try:
            fit = fit_joint([r[n_col] for r in sel], [r["transitions"] for r in sel],
                            [r["best_val_loss"] for r in sel], n_boot=n_boot)
            out[family] = fit.to_dict()
        except FitError as e:
            out[family] = {"error": str(e)}
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.1f}%"


def _interval(f: dict) -> tuple[str, str]:
    """(exponent interval, R²) cells of a fit table: an exact fit has neither."""
    if f["ci_method"] == "exact":
        return "exact (0 degrees of freedom)", "—"
    lo, hi = f["exponent_ci"]
    return f"[{lo:+.3f}, {hi:+.3f}] ({f['ci_method']}, {f['dof']} dof)", f"{f['r2']:.2f}"


def _fit_table(fits: list[dict], what: str) -> list[str]:
    other = "transitions" if fits and "fixed_d" in fits[0] else "model size"
    lines = [f"| family | {other} | exponent | 95% CI (from, degrees of freedom) | gain at 2x | R² (log) | points |",
             "|---" * 7 + "|"]
    for f in fits:
        fixed = f.get("fixed_d", f.get("fixed_n"))
        if "error" in f:
            lines.append(f"| {f['family']} | {fixed:,.0f} | — | {f['error']} | | | |")
            continue
        interval, r2 = _interval(f)
        lines.append(f"| {f['family']} | {fixed:,.0f} | {f['exponent']:+.3f} | {interval} | "
                     f"{_pct(f['gain_2x'])} | {r2} | {f['n_points']} (+{f['n_dropped']} ≤ 0 dropped) |")
    return [f"### {what}", ""] + lines + [""]


def summary_markdown(result: dict) -> str:
    m, n_col = result["metric"], result["model_size_column"]
    lines = [f"# Scaling analysis of `{result['source']}`", "",
             f"Metric: `{m}` (seed means where seeds repeat); model size: `{n_col}`; dataset size: `transitions`. "
             f"{result['n_rows']} rows, families {', '.join(result['families'])}, seeds per grid point: "
             f"{result['seeds_per_point']}.", ""]
    if result["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in result["warnings"]], ""]
    lines += family_markdown(result["family_claim"], result["domain"])
    lines += claim_markdown(result["claim"], result["domain"])
    lines += ["Power-law gains per doubling are in the tables below; a fit through as many points as it has "
              "parameters is exact and has neither R² nor interval.", "", "## Power-law fits (log space)", ""]
    lines += _fit_table(result["fits"]["metric_vs_n"], f"`{m}` vs model size")
    lines += _fit_table(result["fits"]["metric_vs_d"], f"`{m}` vs dataset size")
    lines += _fit_table(result["fits"]["loss_vs_n"], "best validation loss vs model size")
    lines += _fit_table(result["fits"]["loss_vs_d"], "best validation loss vs dataset size")
    lines += ["## Joint fit L(N, D) = E + A/N^α + B/D^β (best validation loss)", ""]
    for fam, j in result["fits"]["joint"].items():
        if "error" in j:
            lines.append(f"- {fam}: not fitted ({j['error']})")
        else:
            ci = j["ci"]
            lines.append(f"- {fam}: E = {j['E']:.4g}, A = {j['A']:.4g}, α = {j['alpha']:.3f} "
                         f"[{ci['alpha'][0]:.3f}, {ci['alpha'][1]:.3f}], B = {j['B']:.4g}, β = {j['beta']:.3f} "
                         f"[{ci['beta'][0]:.3f}, {ci['beta'][1]:.3f}], RMSE(log L) = {j['rmse_log']:.4f}, "
                         f"{j['n_points']} cells")
    lines += ["", f"Figure: `{result['figure']}` ({result['error_bars']}).", ""]
    return "\n".join(lines)


def one_seed_note(seeds: list[int]) -> list[str]:
    if seeds and max(seeds) == 1:
        return ["One seed per grid point: intervals and error bars come from the evaluation episodes of one "
                "training run only; seed-to-seed variation is not measured."]
    return []


def error_bars(points: list[Point]) -> str:
    """The figure caption's words for the error bars of the score panels."""
    sources = {p.error[1] for p in points if p.values}
    words = {"seeds": "std over seeds", "episodes": "standard error over the evaluation episodes (one seed)",
             "none": "none (one seed, no episode spread)"}
    return "score error bars: " + "; ".join(words[s] for s in sorted(sources)) + "; loss: std over seeds where "\
        "there are several, else none"


def analyse(csv_path: Path, out: Path, metric: str = "score_mean", n_boot: int = 1000) -> dict:
    """Runs every fit, writes scaling.{json,md,png} into `out`, returns the result dict."""
    rows = read_results(csv_path)
    if metric not in rows[0]:
        raise ValueError(f"{csv_path}: no column '{metric}'")
    n_col = model_size_column(rows)
    score_pts = group_points(rows, metric, n_col)
    loss_pts = group_points(rows, "best_val_loss", n_col)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "scaling.png"
    envs = sorted({(r.get("env_kind") or "", r.get("env") or "") for r in rows})
    seeds = sorted({len(p.values) for p in score_pts if p.values})
    result = {
        "source": str(csv_path), "metric": metric, "model_size_column": n_col, "n_rows": len(rows),
        "families": sorted({r["family"] for r in rows}), "figure": figure.name,
        "domain": "; ".join(domain_words(*e) for e in envs), "seeds_per_point": seeds,
        "warnings": caveats(rows) + one_seed_note(seeds), "error_bars": error_bars(score_pts),
        "fits": {
            "metric_vs_n": power_law_fits(score_pts, "n", n_boot),
            "metric_vs_d": power_law_fits(score_pts, "d", n_boot),
            "loss_vs_n": power_law_fits(loss_pts, "n", n_boot), "loss_vs_d": power_law_fits(loss_pts, "d", n_boot),
            "joint": joint_fits(rows, n_col, max(20, n_boot // 5)),
        },
        "claim": claim_check(score_pts, n_draws=max(200, n_boot)),
        "family_claim": {f"`{metric}`": family_check(score_pts, True, n_draws=max(200, n_boot)),
                         "best validation loss": family_check(loss_pts, False, n_draws=max(200, n_boot))},
    }
    scaling_figure(score_pts, loss_pts, result["fits"], metric, n_col, figure, result["error_bars"])
    atomic_write_text(out / "scaling.json", json.dumps(result, indent=2, default=float) + "\n")
    atomic_write_text(out / "scaling.md", summary_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.csv written by mambadm.grid")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's folder)")
    parser.add_argument("--metric", default="score_mean", help="score column to fit (e.g. normalized_mean)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per power-law fit")
    args = parser.parse_args(argv)
    try:
        result = analyse(args.results, args.out or args.results.parent, args.metric, args.boot)
    except (FileNotFoundError, ValueError) as e:
        print(f"scaling: {e}", file=sys.stderr)
        return 2
    out = args.out or args.results.parent
    print(summary_markdown(result))
    print(f"wrote {out / 'scaling.md'}, {out / 'scaling.json'}, {out / result['figure']}")
    from mambadm.study.report import write_report  # the study's report gathers this analysis too

    command = ["python -m mambadm.study.scaling", *(argv if argv is not None else sys.argv[1:])]
    print("wrote " + ", ".join(str(p) for p in write_report(out, analysis_command=command)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling grid runner: model sizes × dataset sizes × seeds × families, each cell trained and evaluated for real.

    python -m mambadm.grid configs/grid/X.yaml [--dry-run] [--parallel local|ray|slurm] [--wait] [--out DIR]
                           [--launcher accelerate|python] [--measure] [key=value ...]

`--dry-run` prints every cell (parameters, transitions, steps, tokens, FLOPs = flops_per_token × tokens, estimated
time) and exits. Otherwise each cell runs `accelerate launch -m mambadm.train` (or `python -m mambadm.train`) with its
overrides, then `python -m evaluation.evaluate`; cells run one after another (`local`) or as Ray tasks holding
`resources.gpus_per_cell` / `cpus_per_cell` (`ray`; connects to $RAY_ADDRESS when set, e.g. on a cluster started
from cluster/eval.yaml) or as the tasks of a Slurm job array (`slurm`, `resources.slurm`, mambadm/study/slurm.py:
returns once they are submitted, or follows them to the end with `--wait`). Finished cells are skipped, so a killed
grid restarts where it stopped; a failed cell is reported with its log and the others go on. `OUT/results.csv` gets
one row per finished cell after every cell.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from data_pipeline.atomic import atomic_write_text
from mambadm.config import ConfigError
from mambadm.study.cell import RESULT_COLUMNS, CellFailed, run_cell
from mambadm.study.plan import Cell, base_path, expand, format_table, load_grid


def write_results(out: Path, cells: list[Cell]) -> int:
    """results.csv from every finished cell's row.json, in grid order (atomic); returns the number of rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    n = 0
    for c in cells:
        marker = out / "cells" / c.key / "row.json"
        if marker.is_file():
            row = json.loads(marker.read_text())
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
            n += 1
    atomic_write_text(out / "results.csv", buf.getvalue())
    return n


def _cell_args(grid: Any, grid_file: Path, out: Path, cell: Cell) -> tuple:
    return (cell.to_dict(), out / "cells" / cell.key, base_path(grid, grid_file).resolve(), grid.launcher,
            OmegaConf.to_container(grid.eval), OmegaConf.to_container(grid.resources))


def run_local(grid: Any, grid_file: Path, out: Path, cells: list[Cell]) -> list[CellFailed]:
    failures = []
    for cell in (bar := tqdm(cells, desc="grid", unit="cell")):
        bar.set_postfix_str(cell.key)
        try:
            run_cell(*_cell_args(grid, grid_file, out, cell))
        except CellFailed as e:
            failures.append(e)
            tqdm.write(f"FAILED {e}")
        write_results(out, cells)
    return failures


def run_ray(grid: Any, grid_file: Path, out: Path, cells: list[Cell]) -> list[CellFailed]:
    """Each cell is a Ray task with the cell's resources; results are gathered as they finish."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    task = ray.remote(_ray_cell).options(num_cpus=grid.resources.cpus_per_cell, num_gpus=grid.resources.gpus_per_cell,
                                         max_retries=0)
    pending = {task.remote(*_cell_args(grid, grid_file, out, c)): c for c in cells}
    failures = []
    with tqdm(total=len(cells), desc="grid (ray)", unit="cell") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            error = ray.get(done[0])
            if error:
                failures.append(CellFailed(cell.key, error["stage"], error["code"], Path(error["log"])))
                tqdm.write(f"FAILED {failures[-1]}")
            write_results(out, cells)
            bar.update(1)
    return failures


def _ray_cell(*args: Any) -> dict | None:
    """Ray task body: runs the cell and returns None, or the failure as plain data."""
    try:
        run_cell(*args)
        return None
    except CellFailed as e:
        return {"stage": e.stage, "code": e.code, "log": str(e.log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid YAML (configs/grid/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the grid config")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and their costs, run nothing")
    parser.add_argument("--measure", action="store_true",
                        help="with --dry-run: time a training step per model here for the time estimate")
    parser.add_argument("--parallel", choices=("local", "ray", "slurm"), default="local")
    parser.add_argument("--wait", action="store_true",
                        help="with --parallel slurm: follow the jobs until every cell has ended (default: submit and "
                             "return; rerun the grid later to collect the results)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the grid's 'out')")
    parser.add_argument("--launcher", choices=("accelerate", "python"), default=None,
                        help="override the grid's launcher")
    args = parser.parse_intermixed_args(argv)
    try:
        grid = load_grid(args.grid, args.overrides)
        if args.launcher:
            grid.launcher = args.launcher
        out = (args.out or Path(grid.out)).resolve()
        cells = expand(grid, args.grid, out, measure=args.dry_run and args.measure)
    except (ConfigError, FileNotFoundError) as e:
        print(f"grid: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"grid '{grid.name}': {len(grid.families)} families × {len(grid.sizes)} sizes × "
              f"{len(grid.transitions or grid.fractions)} dataset sizes × {len(grid.seeds)} seeds, "
              f"step rule {grid.step_rule}, output {out}")
        print(format_table(cells))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", OmegaConf.to_yaml(grid))
    atomic_write_text(out / "plan.json", json.dumps([c.to_dict() for c in cells], indent=2) + "\n")
    if args.parallel == "slurm":
        from mambadm.study.slurm import run_slurm
        failures = run_slurm(grid, args.grid, out, cells, wait=args.wait)
    else:
        failures = (run_ray if args.parallel == "ray" else run_local)(grid, args.grid, out, cells)
    n = write_results(out, cells)
    print(f"grid: {n}/{len(cells)} cells done; results: {out / 'results.csv'}")
    for f in failures:
        print(f"grid: FAILED {f}", file=sys.stderr)
    submitted = args.parallel == "slurm" and not args.wait  # cells queued, not failed
    return 1 if failures or (n < len(cells) and not submitted) else 0


if __name__ == "__main__":
    sys.exit(main())

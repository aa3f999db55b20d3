"""A grid's cells in the experiment trackers (``train.trackers``: MLflow, W&B).

Every cell's training is a run of one experiment named after the grid (``train.project``), named after the cell
(``train.run_name``): its parameters, curves and export come from training (mambadm/metrics.py). When the cell is
done, ``log_cell`` adds its grid coordinates (``cell, family, size, transitions, seed, flops``) as parameters and
the rest of its results row (evaluation summary, losses, counts, wall time) as final metrics to that same run, so
the tracker's run table reproduces ``results.csv``. Tracking never fails a cell: a problem goes to
``CELL/tracking.log``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CELL_PARAMS = ("cell", "family", "size", "transitions", "seed", "flops")


def grid_name(cell_dir: Path) -> str:
    """The grid's name from OUT/grid.yaml (OUT/cells/<key> is the cell's folder), else the output folder's name."""
    out = Path(cell_dir).resolve().parent.parent
    grid_file = out / "grid.yaml"
    name = OmegaConf.load(grid_file).get("name") if grid_file.is_file() else None
    return str(name or out.name)


def tracked(cell: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """The cell with the training overrides that make its run the cell's run in the grid's experiment."""
    names = [f"train.project={grid_name(cell_dir)}", f"train.run_name={cell['key']}"]
    return cell | {"overrides": [o for o in cell["overrides"] if o.split("=")[0] not in
                                 ("train.project", "train.run_name")] + names}


def cell_summary(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(parameters, final metrics) of a results row; non-finite numbers (an empty cell of results.csv) are left out."""
    params = {k: row[k] for k in CELL_PARAMS}
    metrics = {k: float(v) for k, v in row.items() if k not in CELL_PARAMS and isinstance(v, (int, float))
               and not isinstance(v, bool) and math.isfinite(v)}
    return params, metrics


def log_mlflow(train_cfg: Any, run_id: str, params: dict, metrics: dict, checkpoint: str) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from mambadm.metrics import tracking_uri

    now = int(time.time() * 1000)
    MlflowClient(tracking_uri(train_cfg)).log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag("checkpoint", checkpoint)])


def log_wandb(train_cfg: Any, run_id: str, run_dir: Path, params: dict, metrics: dict) -> None:
    import wandb

    run = wandb.init(project=train_cfg.project, id=run_id, resume="allow", dir=str(run_dir),
                     name=train_cfg.run_name or None)
    run.config.update(params, allow_val_change=True)
    run.summary.update(metrics)
    run.finish()


def log_cell(cell_dir: Path, row: dict[str, Any]) -> None:
    """The finished cell's coordinates and results into its tracker runs (those named in RUN/trackers.json)."""
    from mambadm.config import from_yaml_text
    from mambadm.metrics import TRACKER_IDS

    run_dir = Path(cell_dir) / "run"
    ids_file = run_dir / TRACKER_IDS
    if not ids_file.is_file():
        return  # no tracker that keeps runs (TensorBoard only, or none)
    try:
        train_cfg = from_yaml_text((run_dir / "config.yaml").read_text()).train
        ids = json.loads(ids_file.read_text())
        params, metrics = cell_summary(row)
        if ids.get("mlflow"):
            log_mlflow(train_cfg, ids["mlflow"], params, metrics, str(row.get("checkpoint", "")))
        if ids.get("wandb"):
            log_wandb(train_cfg, ids["wandb"], run_dir, params, metrics)
    except Exception as e:  # the results row is written; the tracker can be filled in again later
        with (Path(cell_dir) / "tracking.log").open("a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} could not log the cell to its trackers: {e!r}\n")

"""Training metrics on the main process: ``RUN/metrics.jsonl`` rows, the experiment trackers, a tqdm bar.

Trackers (``train.trackers``: ``tensorboard`` by default, ``mlflow``, ``wandb`` or any other tracker Accelerate
knows) are Accelerate's, built here with the run's names: ``check_trackers`` fails at start-up on an unknown name
or a missing package, ``start_trackers`` opens the run (checking that an MLflow server answers first) and logs the
resolved config as parameters; a tracker that fails mid-run is reported once and left out, never stopping training.
The run ids go to ``RUN/trackers.json`` so that a resumed run (and a grid's cell summary) continues the same run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from data_pipeline.atomic import atomic_write_text
from mambadm.config import ConfigError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio",
                    "swanlab": "swanlab"}  # Accelerate's tracker names and the package each one imports
TRACKER_IDS = "trackers.json"  # in the run directory: {tracker: run id}


def tracker_names(train_cfg: Any) -> list[str]:
    """``train.trackers`` without repeats; ``train.tensorboard=false`` (the older switch) leaves TensorBoard out."""
    names = list(dict.fromkeys(str(n) for n in train_cfg.trackers))
    return [n for n in names if n != "tensorboard" or train_cfg.tensorboard]


def check_trackers(train_cfg: Any) -> list[str]:
    """The trackers to start; a ConfigError for an unknown name or a tracker whose package is not installed."""
    names = tracker_names(train_cfg)
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.trackers: unknown tracker '{name}'; known: {sorted(TRACKER_PACKAGES)}")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"train.trackers: '{name}' needs the '{TRACKER_PACKAGES[name]}' package, which is not "
                              f"installed (pip install 'mambadm[trackers]' or pip install {TRACKER_PACKAGES[name]})")
    return names


def tracking_uri(train_cfg: Any) -> str:
    """MLflow's tracking URI: ``train.tracking_uri``, else $MLFLOW_TRACKING_URI, else MLflow's default."""
    if train_cfg.tracking_uri:
        return str(train_cfg.tracking_uri)
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def probe_mlflow(uri: str, timeout_s: int = 10) -> None:
    """One request to the tracking store with no retries: a ConfigError now instead of a stall mid-run."""
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ConfigError(f"train.trackers: mlflow: the tracking store at '{uri}' (train.tracking_uri or "
                          f"MLFLOW_TRACKING_URI) does not answer: {type(e).__name__}: {e}") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def artifact_location(uri: str) -> Optional[str]:
    """A local SQLite store keeps its artifacts beside the database (``mlartifacts/``); a server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def make_trackers(train_cfg: Any, run_dir: Path, names: list[str], ids: dict[str, str]) -> list[Any]:
    """Accelerate tracker objects for ``names``: TensorBoard in RUN/tensorboard, MLflow / W&B runs named
    ``train.run_name`` (default: the run directory's name) in ``train.project``, continuing the runs in ``ids``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, MLflowTracker, TensorBoardTracker, WandBTracker

    run_name = train_cfg.run_name or Path(run_dir).resolve().name
    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(run_dir)))
        elif name == "mlflow":
            import mlflow

            uri = tracking_uri(train_cfg)
            mlflow.set_tracking_uri(uri)
            trackers.append(MLflowTracker(experiment_name=train_cfg.project, logging_dir=artifact_location(uri),
                                          run_id=ids.get("mlflow"), run_name=run_name))
        elif name == "wandb":
            trackers.append(WandBTracker(train_cfg.project, name=run_name, dir=str(run_dir), resume="allow",
                                         id=ids.get("wandb")))
        else:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            args = (train_cfg.project, str(run_dir)) if tracker_class.requires_logging_directory else \
                (train_cfg.project,)
            trackers.append(tracker_class(*args))
    return trackers


def flat_params(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` -> ``{"model.d_model": 128}``; lists become their text."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) or value is None else value
    return out


def tracker_run_ids(accelerator: Any) -> dict[str, str]:
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
    return ids


def saved_run_ids(run_dir: Path, resume: str) -> dict[str, str]:
    path = Path(run_dir) / TRACKER_IDS
    return json.loads(path.read_text()) if resume != "never" and path.is_file() else {}


def start_trackers(accelerator: Any, cfg: Any, run_dir: Path, params: dict) -> None:
    """Opens the trackers' runs (main process) with ``params`` (the flat resolved config) as parameters."""
    names = check_trackers(cfg.train)
    if not names or not accelerator.is_main_process:
        return
    if "mlflow" in names:
        probe_mlflow(tracking_uri(cfg.train))
    accelerator.log_with = make_trackers(cfg.train, run_dir, names, saved_run_ids(run_dir, cfg.train.resume))
    try:
        accelerator.init_trackers(cfg.train.project, config=params)
    except Exception as e:
        raise ConfigError(f"train.trackers: could not start {names}: {type(e).__name__}: {e}") from e
    atomic_write_text(Path(run_dir) / TRACKER_IDS, json.dumps(tracker_run_ids(accelerator), indent=2) + "\n")


def log_export(accelerator: Any, export_dir: Path) -> None:
    """The export directory as an artifact of the runs whose tracker takes artifacts (MLflow, W&B)."""
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.log_artifacts(str(export_dir), artifact_path="export")
            elif tracker.name == "wandb":
                import wandb

                artifact = wandb.Artifact(f"{tracker.run.id}-export", type="model")
                artifact.add_dir(str(export_dir))
                tracker.run.log_artifact(artifact)
        except Exception as e:
            warnings.warn(f"tracker {tracker.name}: the export was not logged as an artifact: {e}")

ROW_KEYS = ("step", "loss", "val_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "params",
            "tokens_seen", "transitions_seen", "samples_seen", "flops")


def truncate_after(path: Path, step: int) -> None:
    """Drops rows logged after ``step`` (by a run killed after its last checkpoint), atomically."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes on the main process only; every other rank gets a logger whose calls do nothing."""

    def __init__(self, accelerator: Any, run_dir: Path, start_step: int, total_steps: int, show_bar: bool):
        self.accelerator = accelerator
        self.failed: set[str] = set()  # trackers that raised once: reported, then left out
        self.main = accelerator.is_main_process
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar: Optional[tqdm] = None
        if self.main:
            truncate_after(self.path, start_step)
            self.file = open(self.path, "a")
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            disable=not show_bar, dynamic_ncols=True)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        row = {**{k: None for k in ROW_KEYS}, **row}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.accelerator.trackers:
            if tracker.name in self.failed:
                continue
            try:
                tracker.log(scalars, step=row["step"])
            except Exception as e:  # a tracking server gone mid-run: metrics.jsonl goes on, training too
                self.failed.add(tracker.name)
                warnings.warn(f"tracker {tracker.name} failed at step {row['step']} and is left out from now on "
                              f"(metrics.jsonl keeps every row): {type(e).__name__}: {e}")

    def progress(self, step: int, loss: float, samples_per_s: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.0f}", tokens_s=f"{tokens_per_s:.0f}")

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.file.close()

"""Experiment trackers with the real packages, offline: MLflow on a local SQLite store read back through MLflow's
client, W&B in offline mode read back from its run files; start-up errors; a grid's cells as runs of one experiment."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from grid_setup import REPO, make_workspace, write_grid
from mambadm.metrics import TRACKER_PACKAGES

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
BLOCK = 32768  # the .wandb log's block size


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("trackers"))


def env_for(ws: Path) -> dict:
    return os.environ | {"MAMBADM_CONFIGS": str(ws / "configs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                         "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


def train(ws: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mambadm.train", str(ws / "base.yaml"), f"train.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env_for(ws), capture_output=True, text=True, timeout=600)


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wandb_records(run_dir: Path) -> list:
    """Every record of the W&B offline runs under ``run_dir``: the ``.wandb`` file is a 7-byte header, then
    LevelDB-log blocks of 32 KiB holding protobuf ``Record``s in chunks (header: crc32, length, type 1-4)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
                pos += BLOCK - pos % BLOCK
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def items(update) -> dict:
    """A W&B config / summary / history update as {key: value} (keys come as ``key`` or ``nested_key``)."""
    return {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in update}


def wandb_history(records: list) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from the history records."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = items(r.history.item)
            step = int(row.pop("_step", r.history.step.num))
            for k, v in row.items():
                if not k.startswith("_") and isinstance(v, (int, float)):
                    out.setdefault(k, {})[step] = float(v)
    return out


def test_a_run_logs_params_metrics_and_export_to_mlflow_and_wandb(ws, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run-a"
    done = train(ws, run_dir, "train.trackers=[tensorboard,mlflow,wandb]", "train.tensorboard=true",
                 f"train.tracking_uri={uri}",
                 "train.project=tracked")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics_rows(run_dir)
    assert (run_dir / "tensorboard").is_dir()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "24" and run.data.params["train.steps"] == "10"
    assert run.data.params["train.run_dir"] == str(run_dir)
    for key in ("loss", "val_loss", "tokens_seen"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        expected = {r["step"]: r[key] for r in rows if r[key] is not None}
        assert logged.keys() == expected.keys() and len(expected) >= 2
        assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/model.pt", "export/config.yaml", "export/env_spec.json", "export/dataset.json"} <= artifacts
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids["mlflow"] == run.info.run_id

    records = wandb_records(run_dir)
    assert records, "no W&B offline run"
    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    values = items(config.update)
    assert values["model.d_model"] == 24 and values["train.project"] == "tracked"
    history = wandb_history(records)
    assert history["loss"] == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows if r["loss"] is not None}
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == ids["wandb"] and run_record.display_name == "run-a"
    assert any(r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model" for r in records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_an_error_at_start_up(ws, tmp_path):
    run_dir = tmp_path / "run-down"
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = train(ws, run_dir, "train.trackers=[mlflow]", f"train.tracking_uri={uri}")
    assert done.returncode == 2
    assert "mambadm.train: error: train.trackers: mlflow" in done.stderr and uri in done.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_an_unknown_tracker_or_a_missing_package_is_an_error_before_anything_starts(ws, tmp_path):
    done = train(ws, tmp_path / "run-x", "train.trackers=[mlfow]")
    assert done.returncode == 2 and "unknown tracker 'mlfow'" in done.stderr
    missing = [name for name, package in TRACKER_PACKAGES.items() if importlib.util.find_spec(package) is None]
    if not missing:
        pytest.skip("every tracker package is installed here")
    done = train(ws, tmp_path / "run-y", f"train.trackers=[{missing[0]}]")
    assert done.returncode == 2
    assert f"'{missing[0]}' needs the '{TRACKER_PACKAGES[missing[0]]}' package, which is not installed" in done.stderr
    assert not (tmp_path / "run-y").exists()


@pytest.mark.slow
def test_grid_cells_are_runs_of_one_experiment_that_reproduce_results_csv(ws, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = write_grid(ws / "tracked-grid.yaml", name="tracked-grid", families="[mambadm]", sizes="[t1]",
                      transitions="[1500, 3000]", steps="4", launcher="python",
                      overrides=f"['train.trackers=[mlflow,wandb]', 'train.tracking_uri={uri}']",
                      eval="{episodes: 2, actors: 1, args: ['--targets', '3600', '--set', 'max_episode_steps=40', "
                           "'--no-progress']}")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--out", str(out)], cwd=REPO,
                          env=env_for(ws), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracked-grid")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {row["cell"] for row in rows}
    for row in rows:
        run = runs[row["cell"]]
        for key in ("family", "size", "transitions", "seed"):
            assert run.data.params[key] == row[key]
        assert float(run.data.params["flops"]) == pytest.approx(float(row["flops"]))
        for key in ("score_mean", "score_std", "final_val_loss", "best_val_loss", "params", "tokens", "steps"):
            assert run.data.metrics[key] == pytest.approx(float(row[key]), rel=1e-9)
        assert client.get_metric_history(run.info.run_id, "loss"), "the cell's training curve"
    for row in rows:
        records = wandb_records(out / "cells" / row["cell"] / "run")
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary |= items(r.summary.update)
        assert summary["score_mean"] == pytest.approx(float(row["score_mean"]))

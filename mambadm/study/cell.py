"""Running one grid cell: the real training CLI, then the real evaluation CLI, then one results row.

A cell folder holds::

    plan.json        the cell as planned (overrides, steps, estimates)
    run/             train.run_dir (checkpoints, metrics.jsonl, export/)
    train.log        stdout + stderr of training (appended on every attempt)
    train.done       written when training exited 0 (with its wall time)
    eval.log         stdout + stderr of evaluation
    results.json     the evaluation's output (moved into place when evaluation exited 0)
    eval.done        written after results.json (with the evaluation's wall time)
    row.json         the cell's results row: the *done* marker, written last, atomically

Re-running a cell is safe at any point: a finished cell (row.json) is skipped, a finished training is not repeated,
and an interrupted training resumes from its last checkpoint (train.resume=auto).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write_text
from mambadm.study.tracking import log_cell, tracked

REPO = Path(__file__).resolve().parents[2]
RESULT_COLUMNS = ("cell", "family", "size", "seed", "params", "non_embedding_params", "transitions", "steps",
                  "tokens", "flops", "final_val_loss", "best_val_loss", "score_mean", "score_std", "normalized_mean",
                  "normalized_std", "wall_time_s", "checkpoint",
                  # what the analysis needs to tell a result from an artefact (appended: older CSVs lack them)
                  "env_kind", "env", "episodes", "truncated_share", "data_return_max", "val_settled_step")
SETTLED_TOLERANCE = 0.01  # validation loss within 1% of its best from some step on counts as settled there


class CellFailed(RuntimeError):
    """A stage of a cell exited non-zero; `log` is the file holding its output."""

    def __init__(self, cell: str, stage: str, code: int, log: Path) -> None:
        super().__init__(f"cell {cell}: {stage} failed with exit code {code}; log: {log}")
        self.cell, self.stage, self.code, self.log = cell, stage, code, log


def train_command(launcher: str, base: Path, overrides: list[str], num_processes: int = 1,
                  accelerate_config: str | None = None) -> list[str]:
    """`accelerate launch [...] -m mambadm.train BASE key=value ...` or `python -m mambadm.train BASE ...`."""
    if launcher == "python":
        return [sys.executable, "-m", "mambadm.train", str(base), *overrides]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd += ["--multi_gpu"]
    return cmd + ["-m", "mambadm.train", str(base), *overrides]


def eval_command(export: Path, output: Path, episodes: int, actors: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "evaluation.evaluate", "--checkpoint", str(export), "--episodes", str(episodes),
            "--actors", str(actors), "--output", str(output), *extra]


def _run_logged(cmd: list[str], log: Path, cell: str, stage: str) -> float:
    """Runs `cmd` from the repository root, appending its output to `log`; returns wall seconds or raises."""
    start = time.time()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        # Without RAY_ADDRESS, evaluation starts its own Ray inside the cell's resources instead of queueing for
        # CPUs on the grid's cluster that this very cell holds (pass `--address auto` in eval.args to join it).
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise CellFailed(cell, stage, code, log)
    return time.time() - start


def settled_step(steps: list[int], losses: list[float], tolerance: float = SETTLED_TOLERANCE) -> float:
    """The first validation step from which every later validation loss stays within `tolerance` (relative) of the
    best one: where the loss stopped moving. nan with fewer than 3 validations (too few to tell)."""
    if len(losses) < 3:
        return float("nan")
    best = min(losses)
    step = steps[-1]
    for s, v in zip(reversed(steps), reversed(losses)):
        if abs(v - best) > tolerance * abs(best):
            break
        step = s
    return float(step)


def run_summary(metrics: Path) -> dict[str, float]:
    """From a run's metrics.jsonl: final and best `val_loss` after step 0 (the untrained model's validation is not a
    result), the step where it settled (`settled_step`), and the `tokens_seen` / `flops` of the last row
    (training counts unpadded steps only, so these are at most the plan's figures); nan where absent."""
    losses, steps, last = [], [], {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            last = rec
            v = rec.get("val_loss")
            if rec.get("step", 0) > 0 and isinstance(v, (int, float)) and math.isfinite(v):  # step 0: untrained
                losses.append(float(v))
                steps.append(int(rec["step"]))
    nan = float("nan")
    return {"final_val_loss": losses[-1] if losses else nan, "best_val_loss": min(losses) if losses else nan,
            "val_settled_step": settled_step(steps, losses),
            "tokens": float(last.get("tokens_seen") or nan), "flops": float(last.get("flops") or nan)}


def scores(results: dict[str, Any], source: Path) -> dict[str, float]:
    """Raw and normalised score mean/std from evaluation's results.json (`targets`: one summary per target return).

    With several targets the best one by raw mean is taken (papers report one number per game). The normalised
    std is the raw std times the normaliser's scale (normalisation is affine: normalized_stderr · sqrt(episodes)).
    `episodes` and `truncated_share` (episodes of that target cut by a step or frame cap) come with it.
    """
    targets = results.get("targets")
    if not targets:
        raise ValueError(f"{source}: no 'targets' summary in the evaluation results")
    best = max(targets, key=lambda t: t["mean"] if t.get("mean") is not None else -math.inf)
    nan = float("nan")
    norm_mean = best.get("normalized_mean")
    norm_std = nan
    if best.get("normalized_stderr") is not None and best.get("episodes", 0) > 0:
        norm_std = float(best["normalized_stderr"]) * math.sqrt(best["episodes"])
    ends = [e.get("end") for e in results.get("episodes", []) if e.get("target") == best["target"]]
    return {"score_mean": float(best["mean"]), "score_std": float(best["std"]),
            "normalized_mean": float(norm_mean) if norm_mean is not None else nan, "normalized_std": norm_std,
            "episodes": int(best.get("episodes", len(ends))),
            "truncated_share": sum(e == "truncated" for e in ends) / len(ends) if ends else nan}


def dataset_facts(export: Path) -> dict[str, Any]:
    """The environment and the dataset's best episode return, from the export's dataset.json (index.json fields)."""
    path = export / "dataset.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    eval_env = info.get("eval_env") or {}
    kind = str(eval_env.get("kind", ""))
    name = str(eval_env.get("game") or eval_env.get("task") or eval_env.get("id") or info.get("env") or "")
    best = (info.get("returns") or {}).get("max")
    return {"env_kind": kind, "env": name, "data_return_max": float(best) if best is not None else float("nan")}


def run_cell(cell: dict[str, Any], cell_dir: Path, base: Path, launcher: str, eval_cfg: dict[str, Any],
             resources: dict[str, Any], train_cmd: list[str] | None = None) -> dict[str, Any]:
    """Trains and evaluates one cell (skipping what is already done) and returns its results row. `train_cmd`, when
    given, replaces the training command (a multi-node Slurm job starts training on every node through srun)."""
    marker = cell_dir / "row.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    cell = tracked(cell, cell_dir)  # its training run: a run named after the cell in the grid's experiment
    atomic_write_text(cell_dir / "plan.json", json.dumps(cell, indent=2) + "\n")
    run_dir = cell_dir / "run"
    export = run_dir / "export"

    train_done = cell_dir / "train.done"
    if not train_done.is_file():
        cmd = train_cmd or train_command(launcher, base, cell["overrides"], int(resources.get("num_processes", 1)),
                                         resources.get("accelerate_config") or None)
        seconds = _run_logged(cmd, cell_dir / "train.log", cell["key"], "training")
        atomic_write_text(train_done, json.dumps({"wall_time_s": seconds}) + "\n")
    train_seconds = float(json.loads(train_done.read_text())["wall_time_s"])

    results_path, eval_done = cell_dir / "results.json", cell_dir / "eval.done"
    if not eval_done.is_file():
        partial = cell_dir / "results.partial.json"
        cmd = eval_command(export, partial, int(eval_cfg["episodes"]), int(eval_cfg["actors"]), list(eval_cfg["args"]))
        seconds = _run_logged(cmd, cell_dir / "eval.log", cell["key"], "evaluation")
        os.replace(partial, results_path)
        atomic_write_text(eval_done, json.dumps({"wall_time_s": seconds}) + "\n")
    eval_seconds = float(json.loads(eval_done.read_text())["wall_time_s"])

    trained = run_summary(run_dir / "metrics.jsonl")
    try:
        evaluation = scores(json.loads(results_path.read_text()), results_path)
    except (ValueError, KeyError, TypeError) as e:
        with (cell_dir / "eval.log").open("a") as log:
            log.write(f"\ngrid: cannot read {results_path}: {e!r}\n")
        raise CellFailed(cell["key"], "reading the evaluation results", 1, cell_dir / "eval.log") from None
    row = {"cell": cell["key"], "family": cell["family"], "size": cell["size"], "seed": cell["seed"],
           "params": cell["params"], "non_embedding_params": cell["non_embedding_params"],
           "transitions": cell["transitions"], "steps": cell["steps"],
           "tokens": trained["tokens"] if math.isfinite(trained["tokens"]) else cell["tokens"],
           "flops": trained["flops"] if math.isfinite(trained["flops"]) else cell["flops"],
           "final_val_loss": trained["final_val_loss"], "best_val_loss": trained["best_val_loss"],
           **evaluation,
           "wall_time_s": round(train_seconds + eval_seconds, 1), "checkpoint": str(export),
           **dataset_facts(export), "val_settled_step": trained["val_settled_step"]}
    atomic_write_text(marker, json.dumps(row, indent=2) + "\n")
    log_cell(cell_dir, row)  # coordinates and results into the cell's tracker runs (mambadm/study/tracking.py)
    return row


"""End to end with the real CLIs: a grid killed mid-run restarts where it stopped (accelerate launch + Ray
evaluation); a failing cell is reported with its log and resumes once fixed; analyses run on the real outputs."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from grid_setup import REPO, make_workspace, write_grid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("grid_e2e"))


def grid_cmd(grid, out, *extra):
    return [sys.executable, "-m", "mambadm.grid", str(grid), "--out", str(out), *extra]


def env_for(ws):
    return os.environ | {"MAMBADM_CONFIGS": str(ws / "configs"), "OMP_NUM_THREADS": "1"}


def test_killed_grid_restarts_where_it_stopped(ws, tmp_path):
    grid = write_grid(ws / "kill.yaml", families="[mambadm]", sizes="[t1]")
    out = tmp_path / "out"
    first, second = out / "cells" / "mambadm-t1-t1500-s0", out / "cells" / "mambadm-t1-t3000-s0"
    proc = subprocess.Popen(grid_cmd(grid, out), cwd=REPO, env=env_for(ws), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (first / "row.json").exists():
            assert proc.poll() is None, "grid exited before its first cell was done"
            assert time.time() < deadline, "first cell not done in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the grid and the training it launched for the second cell
        proc.wait()
    first_row = (first / "row.json").stat().st_mtime_ns
    assert not (second / "row.json").exists()

    rerun = subprocess.run(grid_cmd(grid, out), cwd=REPO, env=env_for(ws), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (first / "row.json").stat().st_mtime_ns == first_row  # finished cell skipped
    assert (first / "train.log").read_text().count("\n$ ") == 1 and "accelerate.commands.launch" in \
        (first / "train.log").read_text()
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["mambadm-t1-t1500-s0", "mambadm-t1-t3000-s0"]
    for r in rows:
        assert float(r["best_val_loss"]) > 0 and float(r["score_mean"]) > 0 and r["checkpoint"].endswith("export")
        assert int(r["transitions"]) >= int(r["cell"].split("-t")[-1].split("-")[0])
    assert int(rows[0]["transitions"]) < int(rows[1]["transitions"])

    scaling = subprocess.run([sys.executable, "-m", "mambadm.study.scaling", str(out / "results.csv"),
                              "--boot", "50"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert scaling.returncode == 0, scaling.stderr
    assert (out / "scaling.png").stat().st_size > 10_000
    eigen = subprocess.run([sys.executable, "-m", "mambadm.study.eigen", rows[0]["checkpoint"], "--delta", "data",
                            "--out", str(tmp_path / "eig")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert eigen.returncode == 0, eigen.stderr
    result = json.loads((tmp_path / "eig" / "eigen.json").read_text())
    assert result["delta_source"] == "data" and len(result["layers"]) == 2  # one GLoMa layer: global + local
    assert result["layers"][0]["discrete_shape"][0] == 8 * 5 * 3  # a validation batch: 8 windows × 5 steps × 3


def test_failed_cell_is_reported_and_resumes_when_fixed(ws, tmp_path):
    grid = write_grid(ws / "fail.yaml", families="[dt]", sizes="[t1]", transitions="[1500]", steps="3",
                      eval="{episodes: 2, actors: 1, args: ['--mode', 'sideways']}")
    out = tmp_path / "out"
    failed = subprocess.run(grid_cmd(grid, out, "--launcher", "python"), cwd=REPO, env=env_for(ws),
                            capture_output=True, text=True, timeout=300)
    cell = out / "cells" / "dt-t1-t1500-s0"
    assert failed.returncode == 1
    assert "evaluation failed" in failed.stderr and str(cell / "eval.log") in failed.stderr
    assert (cell / "train.done").is_file() and not (cell / "row.json").exists()
    assert (out / "results.csv").read_text().count("\n") == 1  # header only

    fixed = subprocess.run(grid_cmd(grid, out, "--launcher", "python", "eval.args=[--targets,3600,--no-progress]"),
                           cwd=REPO, env=env_for(ws), capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (cell / "train.log").read_text().count("\n$ ") == 1  # training was not repeated
    assert (cell / "row.json").is_file()

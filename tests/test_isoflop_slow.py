"""End to end through the real CLIs: the committed tiny isoFLOP grid (configs/grid/hopper-isoflop-tiny.yaml) runs
on freshly collected Hopper shards, then the compute-optimal analysis writes its outputs and the study report."""
import csv
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from grid_setup import REPO, make_workspace

pytestmark = pytest.mark.slow


def test_tiny_isoflop_grid_end_to_end(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    grid = OmegaConf.load(REPO / "configs" / "grid" / "hopper-isoflop-tiny.yaml")
    (ws / "base.yaml").write_text(f"include: [{REPO / 'configs' / 'train' / 'hopper-demo.yaml'}]\n"
                                  f"data:\n  shards: {ws / 'shards'}\n")
    grid.base = str(ws / "base.yaml")
    grid.overrides = [o for o in grid.overrides if not o.startswith("data.shards=")]
    grid.transitions = [3000]  # the workspace holds 6,000 steps
    (ws / "grid.yaml").write_text(OmegaConf.to_yaml(grid))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "mambadm.grid", str(ws / "grid.yaml"), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 and all("-c" in r["cell"] for r in rows)
    for r in rows:  # trained FLOPs (unpadded steps) at most the budget plus half a step
        budget = float(r["cell"].split("-c")[1].split("-s")[0])
        assert 0.5 * budget < float(r["flops"]) < 1.1 * budget and float(r["best_val_loss"]) > 0

    analysis = subprocess.run([sys.executable, "-m", "mambadm.study.compute_optimal", str(out / "results.csv"),
                               "--boot", "20", "--plan", "3e10"], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    for name in ("compute_optimal.json", "compute_optimal.md", "isoflop.png", "frontier.png", "learning_curves.png",
                 "report.md", "report.html"):
        assert (out / name).stat().st_size > 500, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "step_rule: isoflop" in page
    assert "Plan for C = 3e+10" in page

"""The isoflop grid rule on tiny real shards: every (size, budget) cell trains the steps its budget buys, within one
step of the budget; the dry run lists every cell with its FLOPs; a mis-specified rule is named."""
import os
import subprocess
import sys

import pytest

import mambadm.config as config_module
from grid_setup import REPO, make_workspace, write_grid
from mambadm.config import ConfigError
from mambadm.model.base import TOKENS_PER_STEP
from mambadm.study.plan import expand, load_grid

BUDGETS = (2e8, 6e8, 1.8e9)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("isoflop"))


@pytest.fixture
def presets(ws, monkeypatch):
    monkeypatch.setattr(config_module, "CONFIGS_DIR", ws / "configs")
    return ws


def isoflop_grid(ws, name="iso.yaml", **fields):
    return write_grid(ws / name, step_rule="isoflop", flops_budgets=f"[{', '.join(map(str, BUDGETS))}]",
                      transitions="[3000]", **fields)


def test_every_cell_is_within_one_step_of_its_budget(presets):
    grid_file = isoflop_grid(presets, seeds="[0, 1]")
    cells = expand(load_grid(grid_file), grid_file, presets / "out")
    assert len(cells) == 2 * 2 * len(BUDGETS) * 2  # families × sizes × budgets × seeds
    assert cells[0].key == "mambadm-t1-t3000-c2e08-s0" and cells[-1].key == "dt-t2-t3000-c1.8e09-s1"
    for c in cells:
        budget = float(c.key.split("-c")[1].split("-s")[0])
        step_flops = c.flops_per_token * c.global_batch * c.context_len * TOKENS_PER_STEP
        assert c.flops == pytest.approx(c.flops_per_token * c.tokens)
        assert abs(c.flops - budget) <= step_flops / 2 + 1e-6 * budget, c.key
    for budget in BUDGETS:  # at one budget a bigger model trains fewer steps
        at = {(c.family, c.size): c.steps for c in cells if c.key.endswith(f"-c{budget:.3g}-s0".replace("+", ""))}
        assert at[("mambadm", "t1")] > at[("mambadm", "t2")] and at[("dt", "t1")] > at[("dt", "t2")]
    small = [c.steps for c in cells if c.family == "mambadm" and c.size == "t1" and c.seed == 0]
    assert small == sorted(small) and small[-1] > 2 * small[0]  # 9x the budget: 9x the steps (±1)


def test_dry_run_lists_cells_with_flops(ws):
    grid = isoflop_grid(ws, "iso-dry.yaml", families="[mambadm]")
    proc = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"MAMBADM_CONFIGS": str(ws / "configs")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    flops_column = next(line.split() for line in lines if line.startswith("cell")).index("FLOPs")
    rows = [line.split() for line in lines if line.startswith("mambadm-")]
    assert len(rows) == 2 * len(BUDGETS) and "step rule isoflop" in proc.stdout
    for row in rows:
        budget = float(row[0].split("-c")[1].split("-s")[0])
        assert float(row[flops_column]) == pytest.approx(budget, rel=0.5)  # exact bound: the test above


@pytest.mark.parametrize("fields, message", [
    ({"step_rule": "isoflop"}, "flops_budgets"),
    ({"step_rule": "equal_steps", "flops_budgets": "[1e9]"}, "only with it"),
    ({"step_rule": "isoflop", "flops_budgets": "[1e9, -1]"}, "FLOPs > 0"),
])
def test_misconfigured_isoflop_rule_is_named(ws, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(ws / "bad.yaml", **fields))

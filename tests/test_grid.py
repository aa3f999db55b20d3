"""Grid expansion and dry-run figures on tiny real shards: cell counts, exact nested subsets, steps per rule,
FLOPs = flops_per_token × tokens; strict grid configs."""
import math
import os
import subprocess
import sys

import pytest

import mambadm.config as config_module
from grid_setup import REPO, make_workspace, write_grid
from mambadm.config import ConfigError, load_config
from mambadm.data import read_index, select_shards, transitions_of
from mambadm.model import build_model
from mambadm.model.base import TOKENS_PER_STEP
from mambadm.study.plan import env_spec, expand, load_grid


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("grid"))


@pytest.fixture
def presets(ws, monkeypatch):
    monkeypatch.setattr(config_module, "CONFIGS_DIR", ws / "configs")
    return ws


def test_dry_run_cli_lists_every_cell_with_consistent_flops(ws):
    grid = write_grid(ws / "dry.yaml", seeds="[0, 1]")
    proc = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--dry-run", "flops_per_second=1e9"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"MAMBADM_CONFIGS": str(ws / "configs")})
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("mambadm-", "dt-"))]
    assert len(rows) == 2 * 2 * 2 * 2  # families × sizes × data sizes × seeds
    assert "16 cells" in proc.stdout and "FLOP rate constant" in proc.stdout
    index = read_index(ws / "shards")
    for cell, params, non_emb, requested, selected, ratio, steps, batch, tokens, flops, est in rows:
        # parameters and flops_per_token are checked against the models in-process below; here the arithmetic
        tokens, flops = int(tokens.replace(",", "")), float(flops)
        assert tokens == int(steps) * int(batch) * 5 * TOKENS_PER_STEP
        assert float(est[:-1]) == pytest.approx(flops / 1e9, abs=1)
        assert int(non_emb.replace(",", "")) < int(params.replace(",", ""))
        requested, selected = int(requested.replace(",", "")), int(selected.replace(",", ""))
        assert requested == int(cell.split("-")[2][1:]) and selected >= requested
        assert float(ratio) == pytest.approx(selected / requested, abs=5e-4)
    selected = sorted({int(r[4].replace(",", "")) for r in rows})
    assert len(selected) == 2 and selected[0] >= 1500 and selected[1] >= 3000
    assert selected[1] <= transitions_of(index["shards"])
    assert f"data step t1500 -> t3000: requested 2.00x, selected {selected[1] / selected[0]:.2f}x" in proc.stdout


def test_expand_matches_models_and_nested_subsets(presets):
    ws = presets
    grid_file = write_grid(ws / "plan.yaml")
    cells = expand(load_grid(grid_file), grid_file, ws / "out")
    assert [c.key for c in cells][:2] == ["mambadm-t1-t1500-s0", "mambadm-t1-t3000-s0"] and len(cells) == 8
    index = read_index(ws / "shards")
    for c in cells:
        cfg = load_config(ws / "base.yaml", c.overrides)  # what the cell's training will build
        assert cfg.model.d_model == {"t1": 16, "t2": 32}[c.size]  # the preset wins over the base's d_model
        model = build_model(cfg.model, env_spec(ws / "shards"))
        assert c.params == model.num_params() and c.non_embedding_params == model.num_params(non_embedding=True)
        assert c.flops == pytest.approx(model.flops_per_token(5) * c.tokens)
        train, _ = select_shards(index, cfg.data)
        assert c.transitions == transitions_of(train)
        assert f"train.run_dir={ws / 'out' / 'cells' / c.key / 'run'}" in c.overrides
    small, big = (select_shards(index, load_config(ws / "base.yaml", [f"data.subset_transitions={t}"]).data)[0]
                  for t in (1500, 3000))
    assert {s["name"] for s in small} < {s["name"] for s in big}  # nested


def test_step_rules(presets):
    ws = presets
    grid_file = write_grid(ws / "rules.yaml", step_rule="equal_epochs", epochs="2", batch_size_by_size="{t2: 4}")
    for c in expand(load_grid(grid_file), grid_file, ws / "out"):
        assert c.global_batch == (4 if c.size == "t2" else 8)
        assert c.steps == math.ceil(2 * c.transitions / c.global_batch)
    grid_file = write_grid(ws / "compute.yaml", step_rule="equal_compute", steps="40")
    cells = expand(load_grid(grid_file), grid_file, ws / "out")
    budget = cells[0].flops
    assert cells[0].steps == 40
    for c in cells:
        per_step = c.flops_per_token * c.global_batch * 5 * TOKENS_PER_STEP
        assert abs(c.flops - budget) <= per_step / 2 + 1e-6
    assert len({c.steps for c in cells}) > 1  # bigger models get fewer steps


@pytest.mark.parametrize("fields, message", [
    ({"nope": "1"}, "nope"),
    ({"fractions": "[0.5]"}, "exactly one of"),
    ({"step_rule": "equal_luck"}, "step_rule"),
    ({"seeds": "[]"}, "seeds"),
])
def test_bad_grid_config_is_named(ws, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(ws / "bad.yaml", **fields))


def test_dataset_too_small_is_caught_when_planning(presets):
    ws = presets
    grid_file = write_grid(ws / "big.yaml", transitions="[1500, 999999]")
    with pytest.raises(ConfigError, match="999999"):
        expand(load_grid(grid_file), grid_file, ws / "out")


def test_dry_run_refuses_a_missing_shard_folder_like_the_run(ws, tmp_path):
    """No index.json: the dry run exits 2 with the error training gives (no silent Atari spec, no parameter count
    of a model the data cannot build)."""
    (tmp_path / "base.yaml").write_text((ws / "base.yaml").read_text().replace(str(ws / "shards"),
                                                                              str(tmp_path / "nowhere")))
    grid = write_grid(tmp_path / "missing.yaml")
    proc = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"MAMBADM_CONFIGS": str(ws / "configs")})
    assert proc.returncode == 2 and "mambadm-" not in proc.stdout
    assert f"{tmp_path / 'nowhere' / 'index.json'}: not found" in proc.stderr


def test_unknown_preset_and_overrides_typo_name_their_source(presets):
    ws = presets
    grid_file = write_grid(ws / "preset.yaml", sizes="[t1, huge]")
    with pytest.raises(ConfigError, match="huge"):
        expand(load_grid(grid_file), grid_file, ws / "out")
    grid_file = write_grid(ws / "typo.yaml", overrides="[train.stepz=3]")
    with pytest.raises(ConfigError, match=f"{grid_file}: overrides: unknown config key 'train.stepz'"):
        expand(load_grid(grid_file), grid_file, ws / "out")


def test_subset_tolerance_refuses_coarse_subsets(presets):
    """Shards of ~1,000 transitions: 1,500 requested selects 2 shards (~+33%), refused at a 10% tolerance, with the
    numbers; 2,000 requested fits."""
    ws = presets
    grid_file = write_grid(ws / "coarse.yaml", transitions="[1500]", subset_tolerance="0.1")
    with pytest.raises(ConfigError, match=r"t1500: the shards give [\d,]+ transitions for the 1,500 requested"):
        expand(load_grid(grid_file), grid_file, ws / "out")
    index = read_index(ws / "shards")
    two = transitions_of(select_shards(index, load_config(ws / "base.yaml", ["data.subset_transitions=1500"]).data)[0])
    grid_file = write_grid(ws / "fine.yaml", transitions=f"[{two}]", subset_tolerance="0.1")
    cells = expand(load_grid(grid_file), grid_file, ws / "out")
    assert {(c.requested, c.transitions) for c in cells} == {(two, two)}


def test_results_row_reads_truncation_settling_and_dataset_facts(tmp_path):
    """The row's new columns from real file layouts: evaluation episodes' `end`, metrics.jsonl, dataset.json."""
    from mambadm.study.cell import dataset_facts, run_summary, scores

    results = {"targets": [{"target": 1000.0, "episodes": 4, "mean": 990.0, "std": 3.0},
                           {"target": 500.0, "episodes": 4, "mean": 400.0, "std": 9.0}],
               "episodes": [{"target": 1000.0, "end": e} for e in ("truncated", "truncated", "truncated", "terminated")]
               + [{"target": 500.0, "end": "terminated"}] * 4}
    row = scores(results, tmp_path / "results.json")
    assert row["episodes"] == 4 and row["truncated_share"] == 0.75 and row["score_mean"] == 990.0
    metrics = tmp_path / "metrics.jsonl"
    losses = {0: 9.0, 25: 2.0, 50: 1.004, 75: 1.0, 100: 1.006}  # within 1% of the best from step 50 on
    metrics.write_text("".join(f'{{"step": {k}, "val_loss": {v}}}\n' for k, v in losses.items()))
    assert run_summary(metrics)["val_settled_step"] == 50
    metrics.write_text('{"step": 50, "val_loss": 2.0}\n{"step": 100, "val_loss": 1.0}\n')
    assert math.isnan(run_summary(metrics)["val_settled_step"])  # 2 validations: too few to tell
    (tmp_path / "dataset.json").write_text('{"env": "hopper-mixed-v2", "eval_env": {"kind": "mujoco", "task": '
                                           '"hopper"}, "returns": {"max": 1001.4}}')
    assert dataset_facts(tmp_path) == {"env_kind": "mujoco", "env": "hopper", "data_return_max": 1001.4}

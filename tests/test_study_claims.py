"""The paper's first and third claims with intervals: MambaDM vs DT at matched presets, global vs local eigenvalues."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mambadm.config import EnvSpec, load_config
from mambadm.model import build_model
from mambadm.study.branch_claim import branch_measures, summarise
from mambadm.study.family_claim import family_check, matched_points
from mambadm.study.scaling import Point
from tests.real_shards import REPO

SIZES = {"xs": (5e4, 5.2e4), "s": (3e5, 2.9e5), "m": (1.1e6, 1.2e6)}  # (MambaDM N, DT N): matched, not equal


def grid_points(advantage: float, noise: float, seeds: int = 3, seed: int = 0) -> list[Point]:
    """Both families at 3 presets x 2 data sizes; MambaDM's seeds are (1 + advantage) x DT's level, plus noise."""
    rng = np.random.default_rng(seed)
    points = []
    for size, (n_m, n_d) in SIZES.items():
        for d in (1e4, 2e4):
            level = 10.0 + np.log(n_d) + np.log(d)
            for family, n, scale in (("mambadm", n_m, 1 + advantage), ("dt", n_d, 1.0)):
                values = list(level * scale * (1 + noise * rng.standard_normal(seeds)))
                points.append(Point(family, size, n, d, values, [float("nan")] * seeds))
    return points


def test_family_check_finds_a_planted_advantage_and_its_sign_follows_the_measure():
    points = grid_points(advantage=0.2, noise=0.01)
    assert len(matched_points(points)) == 6  # every preset x data size, paired by preset name, not by N
    score = family_check(points, higher_is_better=True)
    assert abs(score["advantage"] - 0.2) < 0.02
    assert score["ci"][0] > 0 and score["verdict"].startswith("MambaDM ahead") and score["answered"]
    loss = family_check(points, higher_is_better=False)  # the same numbers read as a loss: DT is better
    assert loss["ci"][1] < 0 and loss["verdict"].startswith("DT ahead")


def test_family_check_does_not_answer_from_noise_or_without_pairs():
    noisy = family_check(grid_points(advantage=0.0, noise=0.3, seeds=2, seed=4), higher_is_better=True)
    assert noisy["ci"][0] < 0 < noisy["ci"][1] and not noisy["answered"] and "spans zero" in noisy["verdict"]
    one_seed = [Point(f, "xs", 5e4, 1e4, [v], [float("nan")]) for f, v in (("mambadm", 1.0), ("dt", 2.0))]
    single = family_check(one_seed, True)
    assert not single["answered"] and single["pairs"][0]["ci"] is None  # no spread: no interval, no verdict
    only_dt = [p for p in grid_points(0.2, 0.01) if p.family == "dt"]
    assert family_check(only_dt, True)["verdict"].startswith("not answered: no grid point")


def cells(global_share: float, local_share: float, n: int = 8, noise: float = 0.01, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def branch(share):
        return {"share_long": share + noise * rng.standard_normal(), "median": 0.9 + noise * rng.standard_normal()}

    return [{"trained": {"global": branch(global_share), "local": branch(local_share)},
             "init": {"global": branch(0.1), "local": branch(0.1)}} for _ in range(n)]


def test_branch_summary_finds_a_planted_gap_and_says_when_there_is_none():
    gap = summarise(cells(0.3, 0.1))["share_long_global_minus_local"]
    assert gap["ci"][0] < 0.2 < gap["ci"][1] and gap["verdict"] == "global above local"
    none = summarise(cells(0.1, 0.1, noise=0.05))["share_long_global_minus_local"]
    assert none["ci"][0] < 0 < none["ci"][1] and none["verdict"].startswith("not answered")


def test_branch_measures_of_a_real_gloma_model_and_the_cli_names_a_missing_export(tmp_path):
    cfg = load_config(None, ["model.family=mambadm", "model.n_layer=2", "model.d_model=32"]).model
    measures = branch_measures(build_model(cfg, EnvSpec("vector", [11], 3, False, 1000)), 0.99)
    assert set(measures) == {"global", "local"}
    assert all(0 <= m["share_long"] <= 1 and 0 < m["median"] < 1 for m in measures.values())
    with pytest.raises(ValueError, match="no Mamba mixer"):
        branch_measures(build_model(load_config(None, ["model.family=dt", "model.n_layer=1", "model.d_model=32"])
                                    .model, EnvSpec("vector", [11], 3, False, 1000)), 0.99)
    csv = tmp_path / "results.csv"
    csv.write_text("cell,family,checkpoint\nmambadm-xs-t1-s0,mambadm,nowhere/export\n")
    run = subprocess.run([sys.executable, "-m", "mambadm.study.branch_claim", str(csv)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "mambadm-xs-t1-s0" in run.stderr and "not found" in run.stderr
    csv.write_text("cell,family\nmambadm-xs-t1-s0,mambadm\n")
    run = subprocess.run([sys.executable, "-m", "mambadm.study.branch_claim", str(csv)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "['checkpoint']" in run.stderr and str(csv) in run.stderr
    assert not (tmp_path / "branch_claim.md").exists()  # nothing written for bad input

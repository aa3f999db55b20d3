"""The scaling CLI on a synthetic results.csv with known exponents: fits, claim check, figure, exit codes."""
import csv
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from mambadm.study.scaling import analyse
from mambadm.study.cell import RESULT_COLUMNS

SIZES = {"xs": 1e5, "s": 4e5, "m": 1.6e6}
DATA = (25_000, 50_000, 100_000)


def write_csv(path, k_data, k_model, seeds=(0, 1), noise=0.03, sizes=SIZES, data=DATA, **extra):
    """A results.csv whose scores follow 0.5 · d^k_data · n^k_model with log-normal seed noise; `extra` sets further
    columns of every row (e.g. episodes, score_std, truncated_share)."""
    rng = np.random.default_rng(0)
    rows = []
    for family, scale in (("mambadm", 1.0), ("dt", 0.8)):
        for size, n in sizes.items():
            for d in data:
                for seed in seeds:
                    score = scale * 0.5 * d**k_data * n**k_model * np.exp(rng.normal(0, noise))
                    loss = (0.6 + 30 / n**0.3 + 40 / d**0.35) * np.exp(rng.normal(0, 0.003))
                    rows.append({"cell": f"{family}-{size}-t{d}-s{seed}", "family": family, "size": size,
                                 "seed": seed, "params": int(n * 1.2), "non_embedding_params": int(n),
                                 "transitions": d, "steps": 100, "tokens": 100 * 64 * 90, "flops": 1e12,
                                 "final_val_loss": loss * 1.01, "best_val_loss": loss, "score_mean": score,
                                 "score_std": 1.0, "normalized_mean": score / 30, "normalized_std": 0.1,
                                 "wall_time_s": 10.0, "checkpoint": "runs/x/export", **extra})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def test_cli_recovers_exponents_and_writes_outputs(tmp_path):
    write_csv(tmp_path / "results.csv", k_data=0.4, k_model=0.0)
    out = tmp_path / "analysis"
    proc = subprocess.run([sys.executable, "-m", "mambadm.study.scaling", str(tmp_path / "results.csv"),
                           "--out", str(out), "--boot", "100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "scaling.json").read_text())
    vs_d = result["fits"]["metric_vs_d"]
    assert len(vs_d) == 2 * len(SIZES)  # one fit per family and model size
    for fit in vs_d:
        assert fit["exponent"] == pytest.approx(0.4, abs=0.06)
    for fit in result["fits"]["loss_vs_d"]:
        assert fit["exponent"] < 0
    for family, joint in result["fits"]["joint"].items():
        assert joint["alpha"] > 0 and joint["beta"] > 0, family
    claim = result["claim"]["per_family"]["mambadm"]
    assert claim["data_beats_model"] is True
    assert claim["data_gain_mean"] == pytest.approx(2**0.4 - 1, abs=0.08)
    md = (out / "scaling.md").read_text()
    assert "33.7%" in md and "agrees" in md
    w, h = png_size(out / "scaling.png")
    assert w > 600 and h > 400


def test_claim_check_reports_disagreement_from_episode_spread(tmp_path):
    """One seed: the interval comes from the evaluation episodes (std / sqrt(episodes)); a clear model gain with a
    tight episode spread is a clear disagreement, said in the grid's own domain words."""
    write_csv(tmp_path / "results.csv", k_data=0.0, k_model=0.3, seeds=(0,), noise=0.0, score_std=2.0,
              episodes=10, env_kind="atari", env="Breakout")
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=200)
    dt = result["claim"]["per_family"]["dt"]
    assert dt["spread_from"] == "episodes" and dt["answered"] is True
    assert dt["difference_ci"][1] < 0 and dt["verdict"].startswith("disagrees")
    md = (tmp_path / "scaling.md").read_text()
    assert "Atari scores on Breakout" in md and "disagrees" in md
    assert "standard error over the evaluation episodes" in md


def test_claim_check_when_more_data_hurts(tmp_path):
    """The data step lowers the score by ~1.4% (k_data < 0): never 'agrees'. Within a wide episode spread the
    question is not answered; with a tight spread over seeds the verdict is that more data hurt."""
    k = math.log2(1 - 0.014)  # -1.4% per doubling
    write_csv(tmp_path / "results.csv", k_data=k, k_model=0.0, seeds=(0,), noise=0.0, score_std=40.0,
              episodes=5, env_kind="mujoco", env="hopper")
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=200)
    for family, e in result["claim"]["per_family"].items():
        assert e["data_gain_mean"] == pytest.approx(-0.014, abs=1e-6), family
        assert e["data_gain_ci"][0] < 0 < e["data_gain_ci"][1]
        assert e["verdict"].startswith("not answered") and not e["answered"]
    md = (tmp_path / "scaling.md").read_text()
    assert "agrees" not in md.replace("disagrees", "") and "returns on the MuJoCo task hopper" in md
    assert "Atari scores on" not in md

    write_csv(tmp_path / "results.csv", k_data=k, k_model=0.0, seeds=(0, 1, 2), noise=0.002)
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=200)
    for e in result["claim"]["per_family"].values():
        assert e["spread_from"] == "seeds" and e["data_gain_ci"][1] < 0
        assert e["verdict"].startswith("disagrees: more data hurt")


def test_one_seed_without_episode_spread_is_not_answered(tmp_path):
    write_csv(tmp_path / "results.csv", k_data=0.4, k_model=0.0, seeds=(0,))
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=50)
    for e in result["claim"]["per_family"].values():
        assert e["spread_from"] == "none" and e["verdict"].startswith("not answered: one seed")
    assert any("One seed per grid point" in w for w in result["warnings"])


def test_two_point_fits_are_exact(tmp_path):
    """2 model sizes × 2 data sizes × 1 seed: every power law runs through 2 points: no R², no interval."""
    write_csv(tmp_path / "results.csv", k_data=0.2, k_model=0.1, seeds=(0,), sizes={"xs": 1e5, "s": 4e5},
              data=(10_000, 19_000), score_std=5.0, episodes=4)
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=100)
    for key in ("metric_vs_n", "metric_vs_d", "loss_vs_n", "loss_vs_d"):
        for fit in result["fits"][key]:
            assert fit["dof"] == 0 and fit["ci_method"] == "exact"
            assert fit["r2"] is None and fit["exponent_ci"] is None and fit["gain_2x_ci"] is None
    md = (tmp_path / "scaling.md").read_text()
    assert "exact (0 degrees of freedom)" in md and "1.00 |" not in md
    assert "[1.9]" in md  # the data step's ratio, 19,000 / 10,000, is said


def test_saturated_truncated_and_settled_grids_warn(tmp_path):
    write_csv(tmp_path / "results.csv", k_data=0.0, k_model=0.0, seeds=(0,), noise=0.0, score_std=1.0,
              episodes=10, data_return_max=1.0, truncated_share=0.9, val_settled_step=10)
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=50)  # scores 0.5 / 0.4 of a best return of 1.0
    text = " ".join(result["warnings"])
    assert "cut by the episode cap" in text and "settled" not in text and "stopped moving" in text
    assert "best episode return" not in text  # 50% of the best return is not saturated
    write_csv(tmp_path / "results.csv", k_data=0.0, k_model=0.0, seeds=(0,), noise=0.0, score_std=1.0,
              episodes=10, data_return_max=0.505, truncated_share=0.0, val_settled_step=90)
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=50)
    assert len(result["warnings"]) == 2  # one seed + saturated (the 0.5 cells of mambadm, not dt's 0.4)
    assert "9 of 18 cells score at the dataset's best episode return" in result["warnings"][0]
    assert "## Warnings" in (tmp_path / "scaling.md").read_text()


def test_cli_rejects_bad_csv(tmp_path):
    (tmp_path / "bad.csv").write_text("family,size\nmambadm,xs\n")
    proc = subprocess.run([sys.executable, "-m", "mambadm.study.scaling", str(tmp_path / "bad.csv")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing column" in proc.stderr


def test_verdict_says_bigger_models_help_only_when_their_interval_is_above_zero():
    """Data beats the model in all three; what is said of the bigger model follows its own interval."""
    from mambadm.study.claim import verdict

    base = {"spread_from": "seeds", "data_gain_mean": 0.38, "model_gain_mean": 0.08,
            "data_gain_ci": [0.15, 0.75], "difference_ci": [0.04, 0.65]}
    nothing, _ = verdict(base | {"model_gain_ci": [-0.02, 0.04]})
    helps, _ = verdict(base | {"model_gain_ci": [0.02, 0.30]})
    unsure, answered = verdict(base | {"model_gain_ci": [-0.08, 0.33]})
    assert nothing.startswith("agrees: more data helps") and "gains ~nothing" in nothing
    assert helps.startswith("partly") and "bigger models help too" in helps
    assert answered and unsure.startswith("agrees that more data helps more than a bigger model")
    assert "not answered" in unsure and "-8.0%" in unsure and "help too" not in unsure

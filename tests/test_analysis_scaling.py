"""The scaling CLI on a synthetic results.csv with known exponents: fits, claim check, figure, exit codes."""
import csv
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from mambadm.study.scaling import analyse
from mambadm.study.cell import RESULT_COLUMNS

SIZES = {"xs": 1e5, "s": 4e5, "m": 1.6e6}
DATA = (25_000, 50_000, 100_000)


def write_csv(path, k_data, k_model, seeds=(0, 1), noise=0.03):
    rng = np.random.default_rng(0)
    rows = []
    for family, scale in (("mambadm", 1.0), ("dt", 0.8)):
        for size, n in SIZES.items():
            for d in DATA:
                for seed in seeds:
                    score = scale * 0.5 * d**k_data * n**k_model * np.exp(rng.normal(0, noise))
                    loss = (0.6 + 30 / n**0.3 + 40 / d**0.35) * np.exp(rng.normal(0, 0.003))
                    rows.append({"cell": f"{family}-{size}-t{d}-s{seed}", "family": family, "size": size,
                                 "seed": seed, "params": int(n * 1.2), "non_embedding_params": int(n),
                                 "transitions": d, "steps": 100, "tokens": 100 * 64 * 90, "flops": 1e12,
                                 "final_val_loss": loss * 1.01, "best_val_loss": loss, "score_mean": score,
                                 "score_std": 1.0, "normalized_mean": score / 30, "normalized_std": 0.1,
                                 "wall_time_s": 10.0, "checkpoint": "runs/x/export"})
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


def test_claim_check_reports_disagreement(tmp_path):
    write_csv(tmp_path / "results.csv", k_data=0.0, k_model=0.3, seeds=(0,))
    result = analyse(tmp_path / "results.csv", tmp_path, n_boot=50)
    assert result["claim"]["per_family"]["dt"]["data_beats_model"] is False
    assert "disagrees" in (tmp_path / "scaling.md").read_text()


def test_cli_rejects_bad_csv(tmp_path):
    (tmp_path / "bad.csv").write_text("family,size\nmambadm,xs\n")
    proc = subprocess.run([sys.executable, "-m", "mambadm.study.scaling", str(tmp_path / "bad.csv")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing column" in proc.stderr

"""Eigenvalues of the A matrices of a real (tiny) MambaDM export: counts and shapes per layer/branch, the PNG, and
the change from the initialisation (zero for an untrained export, non-zero once trained)."""
import json
import struct
import subprocess
import sys

import numpy as np
import torch

from mambadm.study.eigen import analyse, eigenvalues, main
from mambadm.config import EnvSpec, load_config
from mambadm.export import save_export
from mambadm.study.plan import synthetic_batch
from mambadm.model import build_model

SPEC = EnvSpec(obs_kind="vector", obs_shape=[11], act_dim=3, discrete=False, max_timestep=1000)


def tiny(family="mambadm"):
    cfg = load_config(None, [f"model.family={family}", "model.n_layer=2", "model.d_model=32", "model.d_state=8",
                             "model.local_window=2", "model.backend=ref", "data.context_len=6"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, SPEC)


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def test_cli_on_export_counts_shapes_and_png(tmp_path):
    cfg, model = tiny()
    save_export(tmp_path / "export", model, cfg, SPEC, {"env": "hopper"})
    proc = subprocess.run([sys.executable, "-m", "mambadm.study.eigen", str(tmp_path / "export"),
                           "--out", str(tmp_path / "eig")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eig" / "eigen.json").read_text())
    layers = result["layers"]
    assert [(s["layer"], s["branch"]) for s in layers] == [(0, "global"), (0, "local"), (1, "global"), (1, "local")]
    d_inner = 2 * 32
    for s in layers:
        assert s["continuous_shape"] == [d_inner, 8] and s["discrete_shape"] == [d_inner, 8]
        assert s["n_eigenvalues"] == d_inner * 8
        assert s["A_max"] < 0 and 0 < s["abs_discrete_mean"] < 1
        assert s["delta_min"] > 0
    assert result["delta_source"] == "bias"
    w, h = png_size(tmp_path / "eig" / "eigen.png")
    assert w > 800 and h > 400
    assert "| 1 | local |" in (tmp_path / "eig" / "eigen.md").read_text()


def test_data_delta_matches_model_a_matrices(tmp_path):
    """Δ from real mixer inputs (hooks) equals the model's own a_matrices(batch) at the same inputs."""
    cfg, model = tiny()
    model.eval()
    batch = synthetic_batch(SPEC, 3, 6)
    ours = eigenvalues(model, [batch])
    theirs = model.a_matrices(batch)
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert (a["layer"], a["branch"]) == (b["layer"], b["branch"])
        np.testing.assert_allclose(a["continuous"], b["A"].detach().numpy())
        ref = b["A_discrete"].detach().numpy().reshape(-1, *a["continuous"].shape)
        np.testing.assert_allclose(a["discrete"], ref, rtol=1e-5, atol=1e-6)
    result = analyse(model, tmp_path, "tiny", batches=[batch])
    tokens_global = 3 * 6 * 3  # batch × K × 3 tokens
    assert result["layers"][0]["discrete_shape"] == [tokens_global, 64, 8]


def test_dt_export_is_rejected(tmp_path, capsys):
    cfg, model = tiny("dt")
    save_export(tmp_path / "export", model, cfg, SPEC, {"env": "hopper"})
    assert main([str(tmp_path / "export")]) == 2
    assert "no Mamba mixer" in capsys.readouterr().err


def eigen_cli(export, out):
    proc = subprocess.run([sys.executable, "-m", "mambadm.study.eigen", str(export), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "eigen.json").read_text())


def test_untrained_export_shows_zero_change_from_init(tmp_path):
    cfg, model = tiny()  # seeded like training (train.seed = 0), never trained
    save_export(tmp_path / "export", model, cfg, SPEC, {"env": "hopper"})
    result = eigen_cli(tmp_path / "export", tmp_path / "eig")
    assert "train.seed=0" in result["baseline"] and result["unchanged"] is True
    for s in result["layers"]:
        assert s["change"]["log_abs_A_change_max"] == 0 and s["change"]["share_A_moved_over_0.05"] == 0
        assert s["init"]["share_above_0.99"] == s["share_above_0.99"]
    assert "equal their initialisation" in (tmp_path / "eig" / "eigen.md").read_text()


def test_trained_export_moves_from_init(tmp_path):
    cfg, model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    torch.manual_seed(1)
    batch = synthetic_batch(SPEC, 4, 6)
    for _ in range(5):
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_export(tmp_path / "export", model, cfg, SPEC, {"env": "hopper"})
    result = eigen_cli(tmp_path / "export", tmp_path / "eig")
    assert result["unchanged"] is False
    for s in result["layers"]:
        change = s["change"]
        # five AdamW steps at lr 0.05 move A_log entries by up to ~0.25: |A| by several percent
        assert change["log_abs_A_change_median"] > 0.01 and change["share_A_moved_over_0.05"] > 0.1
        assert change["log_delta_change_median"] > 0
        assert s["init"]["A_max"] == -1.0  # the initialisation's A = -[1..d_state]
    md = (tmp_path / "eig" / "eigen.md").read_text()
    assert "equal their initialisation" not in md and "median \\|Δ log\\|A\\|\\|" in md

"""benchmarks/gpu_session.sh cannot rot: its DRY_RUN=1 mode runs the issue-18 steps on this CPU at tiny shapes (the
triton scan and fused conv in Triton's interpreter, pytest collecting only) and each writes its table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_session_dry_run_writes_every_table(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out, kernels = tmp_path / "out", tmp_path / "kernels"
    kernels.mkdir()
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out), str(kernels)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "build.log").read_text().startswith("DRY_RUN: no kernel build"), (out / "build.log").read_text()
    tests = (out / "scale_tests.txt").read_text()
    assert tests.count(" exit 0") == 2 and "test_outputs_and_gradients_match_ref" in tests, tests[-2000:]
    assert "test_outputs_and_gradients_match_the_pytorch_conv" in tests, tests[-2000:]
    ratio = (out / "scale_triton_ratio.txt").read_text()
    assert ratio.rstrip().endswith("exit 0"), ratio
    rows = [line.split("|") for line in ratio.splitlines() if line.startswith(("| chunked", "| serial"))]
    assert {r[1].strip() for r in rows} == {"chunked", "serial"} and len(rows) == 4, ratio
    assert all(float(r[9]) < 1e-4 for r in rows), ratio  # the gradients against ref, per kernel
    launch = (out / "scale_launch.txt").read_text()
    picked = [line.split("|") for line in launch.splitlines() if line.startswith(("| chunked", "| serial"))]
    assert launch.rstrip().endswith("exit 0") and len(picked) == 2, launch
    exports = (out / "scan_launch.env").read_text()
    assert exports.startswith("export MAMBADM_TRITON_SCAN=") and "export MAMBADM_TRITON_LAUNCH=block=" in exports
    assert f"tables with MAMBADM_TRITON_SCAN={exports.split('=')[1].split()[0]}" in tests, tests[-2000:]
    fused = (out / "scale_fused.txt").read_text()
    assert fused.rstrip().endswith("exit 0") and "failed" not in fused, fused[-2000:]
    parity = [line.split("|") for line in fused.splitlines() if line.startswith("| triton, fused conv")]
    assert len(parity) == 2 and all(float(r[5]) < 1e-5 and float(r[6]) < 1e-5 for r in parity), fused
    steps = json.loads((out / "bench_gpu_fused.json").read_text())["fused_steps"]
    assert [(r["family"], r["backend"], r["fused_conv"]) for r in steps] == \
        [("dt", "-", None), ("mambadm", "triton", False), ("mambadm", "triton", True)]
    assert all(r["step_ms"] > 0 for r in steps) and steps[2]["fused_speedup"] > 0, steps
    pairs = (out / "scale_pairs.txt").read_text()
    assert "### pair xs" in pairs and pairs.rstrip().endswith("exit 0"), pairs
    measured = json.loads((out / "bench_gpu_pairs.json").read_text())["pairs"]
    assert {(r["family"], r["grad_checkpoint"]) for r in measured} == \
        {("dt", False), ("dt", True), ("mambadm", False), ("mambadm", True)}
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in measured)
    profile = (out / "scale_profile.txt").read_text()
    assert "profile: mambadm xs" in profile and profile.rstrip().endswith("exit 0"), profile[-2000:]
    assert "scale steps done" in (out / "env.txt").read_text()
    assert "| target | measured | status |" in done.stdout and "| default scan: chunked |" in done.stdout
    assert "| `cuda` (mamba_ssm) compared with `triton` in the same run | no cuda row" in done.stdout, done.stdout
    assert "| launch the tables ran (bench_triton_scan.py --pick) | " in done.stdout and \
        "| keep its pair's default launch |" in done.stdout, done.stdout  # the dry run tries the defaults only
    # a pairs step cut before it writes its JSON: gpu_targets.py reads the same rows from what the step printed
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_targets

    (out / "bench_gpu_pairs.json").unlink()
    printed = gpu_targets.pair_rows(out)
    assert [(r["family"], r["grad_checkpoint"], r["batch"]) for r in printed] == \
        [(r["family"], r["grad_checkpoint"], r["batch"]) for r in measured]
    assert all(abs(p["tokens_per_s"] - r["tokens_per_s"]) <= 0.5 and abs(p["mfu"] - r["mfu"]) <= 5e-5
               for p, r in zip(printed, measured)), (printed, measured)

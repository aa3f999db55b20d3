"""benchmarks/gpu_session.sh cannot rot: its DRY_RUN=1 mode runs the issue-18 steps on this CPU at tiny shapes (the
triton scan in its interpreter, pytest collecting only) and each writes its table."""
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
    out = tmp_path / "out"
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tests = (out / "scale_tests.txt").read_text()
    assert tests.count(" exit 0") == 4 and "test_outputs_and_gradients_match_ref" in tests, tests[-2000:]
    ratio = (out / "scale_triton_ratio.txt").read_text()
    assert ratio.rstrip().endswith("exit 0"), ratio
    rows = [line.split("|") for line in ratio.splitlines() if line.startswith(("| chunked", "| serial"))]
    assert {r[1].strip() for r in rows} == {"chunked", "serial"} and len(rows) == 4, ratio
    assert all(float(r[9]) < 1e-4 for r in rows), ratio  # the gradients against ref, per kernel
    pairs = (out / "scale_pairs.txt").read_text()
    assert "### pair xs" in pairs and pairs.rstrip().endswith("exit 0"), pairs
    measured = json.loads((out / "bench_gpu_pairs.json").read_text())["pairs"]
    assert {(r["family"], r["grad_checkpoint"]) for r in measured} == \
        {("dt", False), ("dt", True), ("mambadm", False), ("mambadm", True)}
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in measured)
    profile = (out / "scale_profile.txt").read_text()
    assert "profile: mambadm xs" in profile and profile.rstrip().endswith("exit 0"), profile[-2000:]
    assert "scale steps done" in (out / "env.txt").read_text()

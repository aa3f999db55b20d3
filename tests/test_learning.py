"""Learning, not just running: the demo's MambaDM, trained for minutes on the collector's Breakout data, scores
clearly above the uniform random policy in the real game.

Every stage is the project's own command line, as in ``python -m mambadm.demo``: ``collect.py`` (real ALE, DQN-Replay
format) → ``shard.py`` → ``python -m mambadm.train configs/train/breakout-demo.yaml`` → ``python -m
evaluation.evaluate`` (Ray actors, the Atari protocol) for the export and for ``--random-env breakout``, with the same
targets, episode count and seed, hence the same episode seeds. The measurements behind the thresholds are in
benchmarks/RESULTS.md ("Learning check").
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.real_shards import ENV, REPO, real_shards

pytestmark = pytest.mark.slow

TRANSITIONS = 60_000  # the demo's dataset size
EPISODES = 10  # per policy, same episode seeds for both
TARGET = "40"  # the demo config's eval.targets (the best clipped return in the collected data is about 45)
MIN_RATIO = 2.0  # trained mean >= MIN_RATIO x random mean ...
MIN_Z = 3.0  # ... and above it by MIN_Z standard errors of the difference


def evaluate(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "evaluation.evaluate", *args, "--episodes", str(EPISODES), "--targets", TARGET,
           "--seed", "0", "--actors", "2", "--output", str(out), "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    row = json.loads(out.read_text())["targets"][0]
    assert row["episodes"] == EPISODES
    return row


def test_trained_mambadm_beats_the_random_policy(tmp_path_factory):
    shards = real_shards(tmp_path_factory.getbasetemp(), "breakout", TRANSITIONS, 10_000)
    run = tmp_path_factory.mktemp("learning-run")
    start = time.time()
    cmd = [sys.executable, "-m", "mambadm.train", "configs/train/breakout-demo.yaml", f"data.shards={shards}",
           f"train.run_dir={run}", "train.progress=false"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV | {"OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    train_s = time.time() - start

    trained = evaluate(["--checkpoint", str(run / "export")], run / "trained.json")
    random = evaluate(["--random-env", "breakout"], run / "random.json")
    diff_se = math.sqrt(trained["stderr"] ** 2 + random["stderr"] ** 2)
    report = (f"trained {trained['mean']:.2f} ± {trained['stderr']:.2f}, random {random['mean']:.2f} ± "
              f"{random['stderr']:.2f} (mean ± stderr over {EPISODES} episodes), training {train_s:.0f} s")
    print(report)
    assert trained["mean"] >= MIN_RATIO * random["mean"], report
    assert trained["mean"] - random["mean"] >= MIN_Z * diff_se, report

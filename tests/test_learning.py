"""Learning, not just running: the demo's MambaDM, trained for minutes on the collector's Breakout data, scores
clearly above the uniform random policy in the real game.

Every stage is the project's own command line, as in ``python -m mambadm.demo``: ``collect.py`` (real ALE, DQN-Replay
format) → ``shard.py`` → ``python -m mambadm.train configs/train/breakout-demo.yaml`` → ``python -m
evaluation.evaluate`` (Ray actors, the Atari protocol) for the export and for ``--random-env breakout``, with the same
targets, episode count and seed, hence the same episode seeds. The measurements behind the thresholds are in
benchmarks/RESULTS.md ("Learning check"). A quick test pins the initialisation that made learning possible.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from evaluation.envs import make_atari
from mambadm.config import EnvSpec, EvalConfig, load_config
from mambadm.model import build_model
from tests.real_shards import ENV, REPO, real_shards

TRANSITIONS = 60_000  # the demo's dataset size
EPISODES = 10  # per policy, same episode seeds for both
TARGET = "90"  # the Atari protocol's Breakout target, the demo config's eval.targets
MIN_RATIO = 4.0  # trained mean >= MIN_RATIO x random mean ...
MIN_Z = 3.0  # ... and above it by MIN_Z standard errors of the difference


def breakout_stacks(n: int) -> torch.Tensor:
    """``n`` different frame stacks (n, 4, 84, 84) from the real game under the evaluation protocol."""
    env = make_atari("Breakout", OmegaConf.structured(EvalConfig))
    obs, _ = env.reset(seed=0)
    stacks = []
    for step in range(40 * n):
        obs, *_ = env.step(1 if step % 20 == 0 else 2 + step // 20 % 2)  # FIRE, then sweep right / left
        if step % 40 == 39:
            stacks.append(torch.as_tensor(obs))
    env.close()
    return torch.stack(stacks)


@pytest.mark.parametrize("family", ["mambadm", "dt"])
def test_untrained_atari_state_token_depends_on_the_frame_more_than_on_the_timestep(family):
    """Regression: with PyTorch's default init the N(0, 1) timestep rows swamped the CNN's state embedding, so the
    state token was almost only its timestep and training plateaued at the random policy's score."""
    torch.manual_seed(0)
    cfg = load_config("configs/train/breakout-demo.yaml", overrides=[f"model.family={family}"])
    embed = build_model(cfg.model, EnvSpec("atari", [4, 84, 84], 4, True, 1900)).embed.eval()
    stacks = breakout_stacks(4)[:, None]  # (4, K=1, 4, 84, 84)
    n = len(stacks)

    def state_tokens(timesteps: list[int]) -> torch.Tensor:
        t = torch.tensor(timesteps)[:, None]
        _, s, _ = embed.parts(torch.full((n, 1), 20.0), stacks, torch.zeros(n, 1, dtype=torch.long), t)
        return embed.finish(s)[:, 0]

    same_time = state_tokens([100] * n)
    across_frames = torch.pdist(same_time).min()  # the closest two different frames at one timestep
    across_time = (state_tokens([0, 300, 900, 1800]) - same_time).norm(dim=-1).max()  # one frame, other timestep
    assert across_frames > 0.05 and across_time < across_frames, (across_frames.item(), across_time.item())


def evaluate(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "evaluation.evaluate", *args, "--episodes", str(EPISODES), "--targets", TARGET,
           "--seed", "0", "--actors", "2", "--envs-per-actor", "5", "--output", str(out), "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    row = json.loads(out.read_text())["targets"][0]
    assert row["episodes"] == EPISODES
    return row


@pytest.mark.slow
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

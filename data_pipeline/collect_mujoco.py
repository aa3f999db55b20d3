"""Collect a D4RL-format MuJoCo dataset from the real gymnasium environment with hand-written behaviour policies.

The policies are Gaussian around a deterministic mean, so each action's log-probability is known and stored in
``infos/action_log_probs`` like D4RL's SAC policies:

- ``random``: uniform actions (log-probability of the uniform density);
- ``pd``: a proportional-derivative controller pulling every joint to its neutral angle (keeps Hopper and Walker2d
  upright for the whole 1000 steps), with noise scales 0.1 and 0.5 (the large one falls over early);
- ``gait``: an open-loop sinusoid per joint with phase offsets (moves HalfCheetah forward), noise 0.1;
- ``pd+gait``: both, noise 0.2.

Episodes cycle through the policies, so one file mixes returns from falling-at-once to full-length runs. Episodes
end by termination or the 1000-step time limit (``timeouts``); the step budget may cut the last one, which is then
left unterminated at the end of the file, as in D4RL's files.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from data_pipeline.formats.d4rl import write_d4rl
from data_pipeline.sources.mujoco_tasks import TASKS, gym_id

MAX_EPISODE_STEPS = 1000


@dataclass(frozen=True)
class Behaviour:
    name: str
    kp: float = 0.0  # proportional gain towards the neutral joint angle
    kd: float = 0.0  # derivative gain on the joint velocity
    amp: float = 0.0  # sinusoid amplitude per joint
    freq: float = 2.0  # sinusoid frequency (Hz of simulated time)
    noise: float = 0.0  # Gaussian noise std; 0 with kp == amp == 0 means uniform random


BEHAVIOURS = (
    Behaviour("random"),
    Behaviour("pd-low-noise", kp=2.0, kd=0.2, noise=0.1),
    Behaviour("gait", amp=0.5, noise=0.1),
    Behaviour("pd-high-noise", kp=2.0, kd=0.2, noise=0.5),
    Behaviour("pd+gait", kp=1.0, kd=0.1, amp=1.0, noise=0.2),
)


def act(b: Behaviour, qpos: np.ndarray, qvel: np.ndarray, t: float, rng: np.random.Generator,
        act_dim: int) -> tuple[np.ndarray, float]:
    """One action in [-1, 1] and its log-probability under the behaviour (before clipping)."""
    if b.noise == 0.0:
        return rng.uniform(-1.0, 1.0, act_dim), -act_dim * math.log(2.0)
    phase = np.arange(act_dim) * (math.pi / 2)
    mean = -b.kp * qpos[3:] - b.kd * qvel[3:] + b.amp * np.sin(2 * math.pi * b.freq * t + phase)
    eps = rng.standard_normal(act_dim)
    log_prob = float(-0.5 * np.sum(eps**2) - act_dim * (math.log(b.noise) + 0.5 * math.log(2 * math.pi)))
    return np.clip(mean + b.noise * eps, -1.0, 1.0), log_prob


def collect_mujoco(task: str, output_dir: str | Path, transitions: int = 100_000, seed: int = 0) -> Path:
    """Run the behaviours in ``task``'s gymnasium env for ``transitions`` steps; write ``<task>-mixed-v2.hdf5``."""
    env_id, act_dim = gym_id(task), TASKS[task].act_dim
    env = gym.make(env_id, max_episode_steps=MAX_EPISODE_STEPS)
    rng = np.random.default_rng(seed)
    data: dict[str, list] = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals",
                                             "timeouts", "infos/qpos", "infos/qvel", "infos/action_log_probs")}
    returns: dict[str, list[float]] = {}
    episode = 0
    with tqdm(total=transitions, desc=f"collect {env_id}", unit="step") as bar:
        while len(data["rewards"]) < transitions:
            b = BEHAVIOURS[episode % len(BEHAVIOURS)]
            obs, _ = env.reset(seed=seed * 100_003 + episode)
            sim, total, t = env.unwrapped.data, 0.0, 0
            while len(data["rewards"]) < transitions:
                qpos, qvel = sim.qpos.copy(), sim.qvel.copy()
                action, log_prob = act(b, qpos, qvel, t * env.unwrapped.dt, rng, act_dim)
                next_obs, reward, terminated, truncated, _ = env.step(action)
                for key, value in (("observations", obs), ("next_observations", next_obs), ("actions", action),
                                   ("rewards", reward), ("terminals", terminated), ("timeouts", truncated),
                                   ("infos/qpos", qpos), ("infos/qvel", qvel), ("infos/action_log_probs", log_prob)):
                    data[key].append(value)
                obs, total, t = next_obs, total + float(reward), t + 1
                bar.update(1)
                if terminated or truncated:
                    returns.setdefault(b.name, []).append(total)
                    break
            episode += 1
    env.close()
    spread = {name: [float(np.min(r)), float(np.mean(r)), float(np.max(r))] for name, r in returns.items()}
    print(f"{env_id}: {episode} episodes; return min/mean/max per behaviour: "
          + "; ".join(f"{k} {v[0]:.0f}/{v[1]:.0f}/{v[2]:.0f}" for k, v in spread.items()))
    metadata = {"algorithm": "hand-written PD / gait controllers with Gaussian noise, and uniform random",
                "iteration": 0, "env": env_id, "seed": seed, "max_episode_steps": MAX_EPISODE_STEPS,
                "behaviours": str([asdict(b) for b in BEHAVIOURS])}
    arrays = {k: np.asarray(v) for k, v in data.items()}
    return write_d4rl(Path(output_dir) / f"{task}-mixed-v2.hdf5", arrays, metadata)

"""Evaluation env backends: env steps/s per core, gymnasium (the reference) vs EnvPool, in the same run.

Ray rollout actors (1 CPU each, warmed up before the clock starts) run groups of episodes through ``run_group`` as
evaluation does (EnvPool: a pool per group, seeded with the group's episode seeds), with 1 and 2 actors and 1, 4
and 16 envs per actor, on Breakout (DT protocol) and Hopper-v5, with uniform random actions and with a small
untrained MambaDM (3 layers, d=128, recurrent). Per case: steps/s divided by the actors (cores), EnvPool /
gymnasium, and for the model policy the policy's share of the gymnasium step time ``p`` and the gain that share
allows, ``1 / (p + (1 - p) / g)`` with ``g`` the random-action gain of the same row, with the fraction reached.
The emulator alone (ALE, 4 frames per step, no preprocessing) is timed in-process as the bound of any Atari backend.

    python benchmarks/bench_envpool.py [--seconds 4] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.bench_rollout import ENVS, make_policy  # noqa: E402
from evaluation.batch import make_batch  # noqa: E402
from evaluation.evaluate import start_ray  # noqa: E402
from evaluation.rollout import make_tasks, run_group  # noqa: E402
from mambadm.config import EvalConfig  # noqa: E402

ENVS_PER_ACTOR = (1, 4, 16)


@ray.remote(num_cpus=1)
class BackendActor:
    def __init__(self, name: str, family: str, backend: str, n_envs: int):
        torch.set_num_threads(1)
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"env_backend": backend})
        self.batch = make_batch(ENVS[name], cfg, None, n_envs)
        self.policy = make_policy(name, self.batch.action_space, family)

    def run(self, seconds: float, seed: int) -> tuple[int, float, float]:
        """(env steps, policy seconds, env seconds) of whole groups run for about ``seconds``."""
        steps, policy_s, env_s, t0 = 0, 0.0, 0.0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            res = run_group(self.batch, self.policy, make_tasks([90.0], len(self.batch), seed + steps))
            steps += sum(r["length"] for r in res)
            policy_s += res[0]["policy_seconds"] * len(res)
            env_s += res[0]["env_seconds"] * len(res)
        return steps, policy_s, env_s


def measure(name: str, family: str, backend: str, actors: int, n_envs: int, seconds: float) -> tuple[float, float]:
    """(env steps/s per actor, policy share of the step time)."""
    pool = [BackendActor.remote(name, family, backend, n_envs) for _ in range(actors)]
    ray.get([a.run.remote(0.3, i) for i, a in enumerate(pool)])
    t0 = time.perf_counter()
    results = ray.get([a.run.remote(seconds, 1000 * (i + 1)) for i, a in enumerate(pool)])
    wall = time.perf_counter() - t0
    for a in pool:
        ray.kill(a)
    policy_s, env_s = sum(r[1] for r in results), sum(r[2] for r in results)
    return sum(r[0] for r in results) / wall / actors, policy_s / max(policy_s + env_s, 1e-9)


def emulator_bound(seconds: float) -> float:
    """ALE alone: 4 emulator frames per agent step, random minimal-set actions, no preprocessing."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0)
    env.reset(seed=0)
    ale, actions, rng = env.unwrapped.ale, env.unwrapped._action_set, np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = actions[rng.integers(len(actions))]
        for _ in range(4):
            ale.act(a)
        if ale.game_over():
            ale.reset_game()
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per case")
    p.add_argument("--repeat", type=int, default=2, help="runs of every case (side by side: both backends each time)")
    args = p.parse_args()
    import envpool

    print(f"torch {torch.__version__}, ray {ray.__version__}, envpool {envpool.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"ALE alone (Breakout, 4 frames per step): {emulator_bound(args.seconds):.0f} steps/s")
    start_ray(num_cpus=2)
    print("\n| env | policy | actors | envs per actor | gymnasium steps/s per core | EnvPool steps/s per core | "
          "EnvPool / gymnasium | policy share (gymnasium) | gain the share allows | reached |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    random_gain: dict[tuple, list[float]] = {}
    for name in ENVS:
        for family in ("random", "mambadm"):
            for actors in (1, 2):
                for n_envs in ENVS_PER_ACTOR:
                    gains, shares, gym_rates, pool_rates = [], [], [], []
                    for _ in range(args.repeat):
                        g, share = measure(name, family, "gymnasium", actors, n_envs, args.seconds)
                        e, _ = measure(name, family, "envpool", actors, n_envs, args.seconds)
                        gym_rates.append(g), pool_rates.append(e), gains.append(e / g), shares.append(share)
                    key = (name, actors, n_envs)
                    bound = reached = ""
                    if family == "random":
                        random_gain[key] = gains
                    else:
                        env_gain, share = float(np.mean(random_gain[key])), float(np.mean(shares))
                        allowed = 1 / (share + (1 - share) / env_gain)
                        bound, reached = f"{allowed:.2f}", f"{float(np.mean(gains)) / allowed:.2f}"
                    span = lambda v: f"{min(v):.0f}-{max(v):.0f}" if len(v) > 1 else f"{v[0]:.0f}"  # noqa: E731
                    print(f"| {name} | {family} | {actors} | {n_envs} | {span(gym_rates)} | {span(pool_rates)} | "
                          f"{min(gains):.2f}-{max(gains):.2f} | {np.mean(shares):.2f} | {bound} | {reached} |",
                          flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

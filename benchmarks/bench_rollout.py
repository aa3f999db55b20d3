"""Rollout throughput: Ray rollout actors vs one process vs gymnasium's AsyncVectorEnv; policy time per action.

Part 1 — env steps per second, with uniform random actions and *including* policy inference (a small untrained
MambaDM, 3 layers, d=128, acting recurrently, one thread per worker), on preprocessed Breakout and on Hopper:
  single process (1 env) | AsyncVectorEnv with M worker processes (policy batched over M envs in the main process) |
  Ray with M rollout actors (1 env each, each with its own policy copy), M in {1, 2}; then Ray with 2 actors of
  4 and 16 envs each (same two worker processes; AsyncVectorEnv has one env per worker by construction).
Ray actors are started and warmed up before the clock starts (startup is a one-off cost per evaluation).
``--env-backend envpool`` runs the Ray actors' envs on EnvPool (one pool per actor, as evaluation does); the single
process and AsyncVectorEnv columns stay gymnasium, the reference.

Part 2 — policy time per action inside the rollout (``run_group``): recurrent MambaDM vs Decision Transformer
(K = 30 window), re-encoding its window every step as the reference DT code does and on cached step tokens (the
project's default), with 1 and 16 Breakout envs per actor.

    python benchmarks/bench_rollout.py [--seconds 8] [--part 1 2] [--env-backend gymnasium|envpool]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from evaluation.batch import make_batch  # noqa: E402
from evaluation.envs import make_env  # noqa: E402
from evaluation.evaluate import start_ray  # noqa: E402
from evaluation.policy import ModelPolicy, RandomPolicy  # noqa: E402
from evaluation.rollout import make_tasks, run_group  # noqa: E402
from mambadm.config import EnvSpec, EvalConfig, load_config  # noqa: E402
from mambadm.model import build_model  # noqa: E402

ENVS = {"Breakout": {"kind": "atari", "game": "Breakout"}, "Hopper": {"kind": "mujoco", "task": "hopper"}}
ENVS_PER_ACTOR = (4, 16)  # the extra Ray rows of part 1
SPECS = {"Breakout": EnvSpec("atari", [4, 84, 84], 4, True, 4096), "Hopper": EnvSpec("vector", [11], 3, False, 1000)}


def model_cfg(family: str, layers: int, context: int):
    return load_config(overrides=[f"model.family={family}", f"model.n_layer={layers}", "model.d_model=128",
                                  "model.n_head=8", f"data.context_len={context}", "model.dropout=0.0"])


def make_policy(name: str, action_space, family="mambadm", layers=3, context=30, reencode=False):
    if family == "random":
        return RandomPolicy(action_space)
    torch.manual_seed(0)
    cfg = model_cfg(family, layers, context)
    return ModelPolicy(build_model(cfg.model, SPECS[name]), cfg, vars(SPECS[name]), action_space, sample=True,
                       reencode=reencode)


EVAL_CFG = OmegaConf.structured(EvalConfig)


def steps_single(name: str, family: str, seconds: float) -> float:
    env = make_env(ENVS[name], EVAL_CFG)
    policy = make_policy(name, env.action_space, family)
    obs, _ = env.reset(seed=0)
    policy.start([90.0], [0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = policy.act(obs[None])
        obs, r, term, trunc, _ = env.step(a[0])
        policy.observe(np.array([r]))
        n += 1
        if term or trunc:
            obs, _ = env.reset(seed=n)
            policy.start([90.0], [n])
    return n / (time.perf_counter() - t0)


def _thunk(name: str):
    return lambda: make_env(ENVS[name], OmegaConf.structured(EvalConfig))


def steps_async(name: str, family: str, workers: int, seconds: float) -> float:
    venv = gym.vector.AsyncVectorEnv([_thunk(name) for _ in range(workers)])
    policy = make_policy(name, venv.single_action_space, family)
    obs, _ = venv.reset(seed=list(range(workers)))
    policy.start([90.0] * workers, list(range(workers)))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = policy.act(obs)
        obs, r, term, trunc, _ = venv.step(a)
        policy.observe(r)
        n += workers
        if (term | trunc).any():  # autoreset happens on the next step; restart the policy state of the batch
            policy.start([90.0] * workers, list(range(n, n + workers)))
    venv.close()
    return n / (time.perf_counter() - t0)


@ray.remote(num_cpus=1)
class ThroughputActor:
    """Runs groups of ``n_envs`` episodes in lockstep (one batched policy call per step), as rollout actors do."""

    def __init__(self, name: str, family: str, n_envs: int = 1, backend: str = "gymnasium"):
        torch.set_num_threads(1)
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"env_backend": backend})
        self.envs = make_batch(ENVS[name], cfg, None, n_envs)
        self.policy = make_policy(name, self.envs.action_space, family)

    def run(self, seconds: float, seed: int) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            res = run_group(self.envs, self.policy, make_tasks([90.0], len(self.envs), seed + n))
            n += sum(r["length"] for r in res)
        return n, time.perf_counter() - t0


BACKEND = "gymnasium"  # the Ray actors' env backend (--env-backend)


def steps_ray(name: str, family: str, actors: int, seconds: float, envs_per_actor: int = 1) -> float:
    pool = [ThroughputActor.remote(name, family, envs_per_actor, BACKEND) for _ in range(actors)]
    ray.get([a.run.remote(0.5, i) for i, a in enumerate(pool)])  # warm: envs and policies built, code paths hot
    t0 = time.perf_counter()
    results = ray.get([a.run.remote(seconds, 1000 * i) for i, a in enumerate(pool)])
    wall = time.perf_counter() - t0
    for a in pool:
        ray.kill(a)
    return sum(n for n, _ in results) / wall


def part1(seconds: float) -> None:
    start_ray(num_cpus=2)
    print("\n| env | policy | one process | AsyncVectorEnv×1 | Ray×1 | AsyncVectorEnv×2 | Ray×2 | Ray×2 / (2·Ray×1) | "
          "Ray×2 / AsyncVectorEnv×2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_actor = []
    for name, family in ((n, f) for n in ENVS for f in ("random", "mambadm")):
        one = steps_single(name, family, seconds)
        av1, r1 = steps_async(name, family, 1, seconds), steps_ray(name, family, 1, seconds)
        av2, r2 = steps_async(name, family, 2, seconds), steps_ray(name, family, 2, seconds)
        print(f"| {name} | {family} | {one:.0f} | {av1:.0f} | {r1:.0f} | {av2:.0f} | {r2:.0f} | {r2 / (2 * r1):.2f} | "
              f"{r2 / av2:.2f} |", flush=True)
        more = [steps_ray(name, family, 2, seconds, envs) for envs in ENVS_PER_ACTOR]
        per_actor.append(f"| {name} | {family} | {av2:.0f} | {r2:.0f} | " + " | ".join(f"{r:.0f}" for r in more)
                         + f" | {max(r2, *more) / av2:.2f} |")
    # Same two worker processes, but each Ray actor owning several envs (one batched policy call per step for
    # them, as `--envs-per-actor` does); AsyncVectorEnv has one env per worker by construction.
    print("\n| env | policy | AsyncVectorEnv×2 | Ray×2, 1 env per actor | "
          + " | ".join(f"Ray×2, {e} envs per actor" for e in ENVS_PER_ACTOR) + " | best Ray×2 / AsyncVectorEnv×2 |")
    print("|---|---|---|---|" + "---|" * len(ENVS_PER_ACTOR) + "---|")
    print("\n".join(per_actor), flush=True)
    ray.shutdown()


def part2(frames: int) -> None:
    torch.set_num_threads(1)
    cfg = OmegaConf.merge(EVAL_CFG, {"max_episode_frames": frames})
    print("\n| policy | envs per actor | ms per batched call | ms per action | ratio to MambaDM (same envs) |")
    print("|---|---|---|---|---|")
    for n_envs in (1, 16):
        envs = [make_env(ENVS["Breakout"], cfg) for _ in range(n_envs)]
        per_action = {}
        for label, family, reencode in (("MambaDM recurrent", "mambadm", False),
                                        ("DT window K=30, re-encoding", "dt", True),
                                        ("DT window K=30, cached tokens", "dt", False)):
            policy = make_policy("Breakout", envs[0].action_space, family=family, layers=6, context=30,
                                 reencode=reencode)
            res = run_group(envs, policy, make_tasks([90.0], n_envs, 0))
            calls = res[0]["policy_calls"]
            total = res[0]["policy_seconds"] * n_envs
            per_action[label] = total / (calls * n_envs)
            base = per_action["MambaDM recurrent"]
            print(f"| {label} | {n_envs} | {1000 * total / calls:.2f} | {1000 * per_action[label]:.2f} | "
                  f"{per_action[label] / base:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per throughput case")
    p.add_argument("--frames", type=int, default=400, help="Atari frame cap per episode in part 2 (4 per action)")
    p.add_argument("--part", type=int, nargs="+", default=[1, 2])
    p.add_argument("--env-backend", default="gymnasium", choices=("gymnasium", "envpool"),
                   help="the Ray actors' env backend in part 1")
    args = p.parse_args()
    global BACKEND
    BACKEND = args.env_backend
    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, Ray actors' envs: {BACKEND}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if 1 in args.part:
        part1(args.seconds)
    if 2 in args.part:
        part2(args.frames)


if __name__ == "__main__":
    main()

"""Evaluation env backends: env steps/s per core, gymnasium (the reference) vs EnvPool, in the same run.

Ray rollout actors (1 CPU each, warmed up before the clock starts: envs built, EnvPool's pool made at the warm-up's
first group) run groups of episodes through ``run_group`` as evaluation does (EnvPool: one pool per actor, made once
and reset per episode; only running slots stepped), with 1 and 2 actors and 1, 4 and 16 envs per actor, on Breakout
(DT protocol) and Hopper-v5, with uniform random actions and with a small untrained MambaDM (3 layers, d=128,
recurrent). Per case: steps/s divided by the actors (cores), EnvPool / gymnasium, and for the model policy the
policy's share of the gymnasium step time ``p`` and the gain that share allows, ``1 / (p + (1 - p) / g)`` with ``g``
the random-action gain of the same row, with the fraction reached.

Bounds, timed in-process in the same run (one core, random actions, Breakout): ALE alone (4 emulator frames per
agent step, no preprocessing: what no Atari backend can beat), the gymnasium reference env alone, EnvPool's
stepping alone (one thread, 1/4/16 envs, auto-reset), the one-off cost of making a pool, and the emulation cost
per frame of ale-py's ALE and of the ALE build inside EnvPool (40 frames per step, preprocessing amortised).
``ALE alone / gymnasium alone`` is the most any backend can gain over the reference on this machine; each
random-action Breakout row reports its gain as a fraction of it.

The MuJoCo split, in-process (one core, Hopper, random actions, 1/4/16 envs; microseconds per env step): the
gymnasium reference env's ``step``; EnvPool's C++ calls alone (``_send`` + ``_recv``: the step, the hand-off to its
worker thread and back, pybind); EnvPool's gymnasium ``step`` (its Python wrapper on top); the batch's ``step``
(``EnvPoolBatch``, what ``run_group`` calls); and the hand-off alone (CartPole, 1 env: its C++ step is ~1 us).

    python benchmarks/bench_envpool.py [--seconds 4] [--repeat 2] [--envs Hopper]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.bench_rollout import ENVS, make_policy  # noqa: E402
from evaluation.batch import make_batch  # noqa: E402
from evaluation.envpool_envs import SmallMuJoCoPoolWarning  # noqa: E402
from evaluation.evaluate import start_ray  # noqa: E402
from evaluation.rollout import make_tasks, run_group  # noqa: E402
from mambadm.config import EvalConfig  # noqa: E402

ENVS_PER_ACTOR = (1, 4, 16)


@ray.remote(num_cpus=1)
class BackendActor:
    def __init__(self, name: str, family: str, backend: str, n_envs: int):
        torch.set_num_threads(1)
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"env_backend": backend, "envs_per_actor": n_envs})
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


def emulator_bound(seconds: float, frames: int = 4) -> float:
    """ALE alone (ale-py): ``frames`` emulator frames per agent step, random minimal-set actions, no
    preprocessing."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0)
    env.reset(seed=0)
    ale, actions, rng = env.unwrapped.ale, env.unwrapped._action_set, np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = actions[rng.integers(len(actions))]
        for _ in range(frames):
            ale.act(a)
        if ale.game_over():
            ale.reset_game()
        n += 1
    return n / (time.perf_counter() - t0)


def reference_alone(seconds: float) -> float:
    """The gymnasium reference env (DT protocol, frame stack) alone: random actions, a seeded reset per episode."""
    from evaluation.envs import make_env

    env = make_env(ENVS["Breakout"], OmegaConf.structured(EvalConfig))
    env.reset(seed=0)
    rng, n, t0 = np.random.default_rng(0), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        n += 1
        if term or trunc:
            env.reset(seed=n)
    return n / (time.perf_counter() - t0)


def envpool_alone(seconds: float, n_envs: int, frame_skip: int = 4) -> tuple[float, float]:
    """EnvPool's stepping alone (one thread, the protocol's options, auto-reset): (env steps/s, seconds to make the
    pool)."""
    import envpool

    from evaluation.envpool_envs import envpool_id, envpool_kwargs

    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"frame_skip": frame_skip,
                                                             "max_episode_frames": 108000 * frame_skip})
    t0 = time.perf_counter()
    pool = envpool.make(envpool_id(ENVS["Breakout"], cfg), env_type="gymnasium", num_envs=n_envs, batch_size=n_envs,
                        num_threads=1, env_seed=list(range(n_envs)), **envpool_kwargs(ENVS["Breakout"], cfg))
    made = time.perf_counter() - t0
    pool.reset()
    rng, n, t0 = np.random.default_rng(0), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pool.step(rng.integers(pool.action_space.n, size=n_envs))
        n += n_envs
    rate = n / (time.perf_counter() - t0)
    pool.close()
    return rate, made


def per_env_step_us(step, envs_per_call: int, seconds: float) -> float:
    """Microseconds per env step of ``step()`` (which steps ``envs_per_call`` envs), called for ``seconds``."""
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        calls += 1
    return (time.perf_counter() - t0) / calls / envs_per_call * 1e6


def mujoco_split(seconds: float, n_envs: int) -> dict[str, float]:
    """The MuJoCo split (module doc) for ``n_envs`` envs: microseconds per env step of each layer."""
    import envpool

    from evaluation.envs import make_env

    cfg = OmegaConf.structured(EvalConfig)
    rng = np.random.default_rng(0)
    env = make_env(ENVS["Hopper"], cfg)
    env.reset(seed=0)

    def reference_step():
        if any(env.step(rng.uniform(-1, 1, 3))[2:4]):
            env.reset(seed=int(rng.integers(2**31)))

    def pool(task_id: str, n: int):
        made = envpool.make(task_id, env_type="gymnasium", num_envs=n, batch_size=n, num_threads=1,
                            env_seed=list(range(n)))
        made.reset()
        return made

    ids, raw, wrapped = np.arange(n_envs, dtype=np.int32), pool("Hopper-v5", n_envs), pool("Hopper-v5", n_envs)
    cart, one, cart_action = pool("CartPole-v1", 1), np.zeros(1, np.int32), np.zeros(1, np.int32)
    batch = make_batch(ENVS["Hopper"], OmegaConf.merge(cfg, {"env_backend": "envpool", "envs_per_actor": n_envs}),
                       None, n_envs)
    batch.reset(list(range(n_envs)))
    active = np.ones(n_envs, bool)

    def raw_step():  # EnvPool reads the actions until _recv returns: they stay referenced here until then
        actions = rng.uniform(-1, 1, (n_envs, 3))
        raw._send([ids, ids, actions])
        raw._recv()

    def hand_off():
        cart._send([one, one, cart_action])
        cart._recv()

    def batch_step():
        _, _, terminated, truncated = batch.step(rng.uniform(-1, 1, (n_envs, 3)), active)
        if (terminated | truncated).any():
            batch.reset(list(range(n_envs)))

    out = {"gymnasium reference env `step`": per_env_step_us(reference_step, 1, seconds),
           "EnvPool C++ calls alone (`_send` + `_recv`)": per_env_step_us(raw_step, n_envs, seconds),
           "EnvPool's gymnasium `step`": per_env_step_us(
               lambda: wrapped.step(rng.uniform(-1, 1, (n_envs, 3)), env_id=ids), n_envs, seconds),
           "`EnvPoolBatch.step`": per_env_step_us(batch_step, n_envs, seconds),
           "hand-off alone (CartPole, 1 env), per call": per_env_step_us(hand_off, 1, seconds)}
    for made in (raw, wrapped, cart):
        made.close()
    batch.close()
    return out


def print_mujoco_split(seconds: float, repeat: int) -> None:
    print(f"\nMuJoCo split, in-process, one core, Hopper, random actions: us per env step (mean of {repeat})")
    print("\n| layer | " + " | ".join(f"{n} envs" for n in ENVS_PER_ACTOR) + " |")
    print("|---|" + "---|" * len(ENVS_PER_ACTOR))
    runs = {n: [mujoco_split(seconds, n) for _ in range(repeat)] for n in ENVS_PER_ACTOR}
    for layer in runs[ENVS_PER_ACTOR[0]][0]:
        print(f"| {layer} | " + " | ".join(f"{np.mean([r[layer] for r in runs[n]]):.1f}" for n in ENVS_PER_ACTOR)
              + " |", flush=True)


def print_atari_bounds(seconds: float, repeat: int) -> float:
    """The Breakout bounds (module doc); returns ALE alone / the reference."""
    ale = float(np.mean([emulator_bound(seconds) for _ in range(repeat)]))
    reference = float(np.mean([reference_alone(seconds) for _ in range(repeat)]))
    bound = ale / reference
    print(f"\nIn-process, one core, Breakout, random actions (mean of {repeat}):")
    print(f"- ALE alone (4 frames per step): {ale:.0f} steps/s; gymnasium reference env alone: {reference:.0f}; "
          f"bound ALE / reference = {bound:.2f}x")
    # Emulation per frame, at 40 frames per agent step (the preprocessing of one step shared by 40 frames): ale-py's
    # ALE against the ALE build inside EnvPool, and what 4 frames of each leave to the rest of a step.
    ale_frame = float(np.mean([1e6 / emulator_bound(seconds, 40) / 40 for _ in range(repeat)]))
    pool_frame = float(np.mean([1e6 / envpool_alone(seconds, 1, 40)[0] / 40 for _ in range(repeat)]))
    print(f"- emulation per frame (40 frames per step): ale-py {ale_frame:.1f} us, EnvPool's ALE {pool_frame:.1f} us "
          f"({pool_frame / ale_frame:.2f}x); 4 frames of EnvPool's emulation alone would run "
          f"{1e6 / 4 / pool_frame:.0f} "
          f"steps/s ({1e6 / 4 / pool_frame / reference:.2f}x the reference)")
    for n_envs in ENVS_PER_ACTOR:
        rate, made = envpool_alone(seconds, n_envs)
        print(f"- EnvPool stepping alone, {n_envs} envs: {rate:.0f} steps/s ({rate / reference:.2f}x the reference, "
              f"{rate / ale:.2f} of ALE alone); making the pool: {made:.2f} s", flush=True)
    return bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per case")
    p.add_argument("--repeat", type=int, default=2, help="runs of every case (side by side: both backends each time)")
    p.add_argument("--envs", nargs="+", choices=list(ENVS), default=list(ENVS),
                   help="envs to measure (the Breakout bounds run with Breakout, the MuJoCo split with Hopper)")
    args = p.parse_args()
    warnings.simplefilter("ignore", SmallMuJoCoPoolWarning)  # the rows below measure those pools on purpose
    import envpool

    print(f"torch {torch.__version__}, ray {ray.__version__}, envpool {envpool.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    bound = print_atari_bounds(args.seconds, args.repeat) if "Breakout" in args.envs else None
    if "Hopper" in args.envs:
        print_mujoco_split(args.seconds, args.repeat)
    start_ray(num_cpus=2)
    print("\n| env | policy | actors | envs per actor | gymnasium steps/s per core | EnvPool steps/s per core | "
          "EnvPool / gymnasium | of the ALE bound | policy share (gymnasium) | gain the share allows | reached |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    random_gain: dict[tuple, list[float]] = {}
    for name in args.envs:
        for family in ("random", "mambadm"):
            for actors in (1, 2):
                for n_envs in ENVS_PER_ACTOR:
                    gains, shares, gym_rates, pool_rates = [], [], [], []
                    for _ in range(args.repeat):
                        g, share = measure(name, family, "gymnasium", actors, n_envs, args.seconds)
                        e, _ = measure(name, family, "envpool", actors, n_envs, args.seconds)
                        gym_rates.append(g), pool_rates.append(e), gains.append(e / g), shares.append(share)
                    key = (name, actors, n_envs)
                    allowed = reached = of_bound = ""
                    if family == "random":
                        random_gain[key] = gains
                        if name == "Breakout":
                            of_bound = f"{float(np.mean(gains)) / bound:.2f}"
                    else:
                        env_gain, share = float(np.mean(random_gain[key])), float(np.mean(shares))
                        gain_allowed = 1 / (share + (1 - share) / env_gain)
                        allowed, reached = f"{gain_allowed:.2f}", f"{float(np.mean(gains)) / gain_allowed:.2f}"
                    span = lambda v: f"{min(v):.0f}-{max(v):.0f}" if len(v) > 1 else f"{v[0]:.0f}"  # noqa: E731
                    print(f"| {name} | {family} | {actors} | {n_envs} | {span(gym_rates)} | {span(pool_rates)} | "
                          f"{min(gains):.2f}-{max(gains):.2f} | {of_bound} | {np.mean(shares):.2f} | {allowed} | "
                          f"{reached} |", flush=True)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ray.shutdown()


if __name__ == "__main__":
    main()

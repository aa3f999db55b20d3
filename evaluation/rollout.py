"""Run groups of episodes in lockstep: a batch of envs (evaluation/batch.py), one batched policy call per step.

No Ray here: a Ray actor (evaluation/actors.py), the benchmark and the tests all call ``run_group``.
"""
from __future__ import annotations

import io
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from evaluation.batch import as_batch

MAX_GIF_FRAMES = 600  # recordings keep at most this many frames (evenly strided)


@dataclass(frozen=True)
class EpisodeTask:
    target: float  # raw target return
    index: int  # episode index within its target
    seed: int  # env reset seed and the policy's sampling seed
    record: bool = False  # return a GIF of this episode


def episode_seed(eval_seed: int, target: float, index: int) -> int:
    """A seed that depends only on (eval seed, target, episode index), never on which worker runs the episode."""
    target_key = zlib.crc32(f"{float(target):.6g}".encode())
    return int(np.random.SeedSequence([int(eval_seed) & 0xFFFFFFFF, target_key, int(index)]).generate_state(1)[0])


def make_tasks(targets: list[float], episodes: int, eval_seed: int, record: bool = False) -> list[EpisodeTask]:
    """``episodes`` tasks per target; with ``record`` the first episode of each target is recorded."""
    return [EpisodeTask(float(tg), i, episode_seed(eval_seed, tg, i), record and i == 0)
            for tg in targets for i in range(episodes)]


def groups_of(tasks: list[EpisodeTask], size: int) -> list[list[EpisodeTask]]:
    """Fixed consecutive groups, so a group's members (and any batching effect) never depend on scheduling."""
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


class _Recorder:
    """Keeps at most MAX_GIF_FRAMES rendered frames by doubling the stride whenever the buffer fills."""

    def __init__(self):
        self.frames: list[np.ndarray] = []
        self.stride, self.seen = 1, 0

    def add(self, frame: Optional[np.ndarray]) -> None:
        if frame is not None and self.seen % self.stride == 0:
            self.frames.append(np.asarray(frame))
            if len(self.frames) >= MAX_GIF_FRAMES:
                self.frames, self.stride = self.frames[::2], self.stride * 2
        self.seen += 1

    def gif(self) -> bytes:
        import imageio.v2 as imageio

        buf = io.BytesIO()
        imageio.mimwrite(buf, self.frames, format="GIF", duration=1000 / 30 * self.stride / 1000, loop=0)
        return buf.getvalue()


def run_group(envs: Any, policy: Any, tasks: list[EpisodeTask], fault_hook: Optional[Any] = None) -> list[dict]:
    """Runs ``tasks`` (at most ``len(envs)``) to the end of their episodes; one result dict per task. ``envs`` is a
    batch (evaluation/batch.py) or a list of gymnasium envs.

    Finished slots keep receiving their last observation so the batch shape stays fixed; their actions are ignored.
    ``fault_hook(step)`` is called every step (tests use it to kill the worker process mid-episode).
    """
    batch = as_batch(envs)
    if len(tasks) > len(batch):
        raise ValueError(f"{len(tasks)} episodes for {len(batch)} envs")
    n = len(tasks)
    obs = batch.reset([t.seed for t in tasks])
    recorders = {i: _Recorder() for i in range(n) if tasks[i].record}
    for i, rec in recorders.items():
        rec.add(batch.render(i))
    policy.start([t.target for t in tasks], [t.seed for t in tasks])
    done = np.zeros(n, bool)
    returns, lengths = np.zeros(n), np.zeros(n, np.int64)
    ends = [""] * n
    policy_s = env_s = 0.0
    step = 0
    while not done.all():
        if fault_hook is not None:
            fault_hook(step)
        t0 = time.perf_counter()
        actions = policy.act(obs)
        t1 = time.perf_counter()
        active = ~done
        new_obs, rewards, terminated, truncated = batch.step(actions, active)
        obs[active] = new_obs[active]
        rewards = np.where(active, rewards, 0.0)
        returns += rewards
        lengths += active
        for i, rec in recorders.items():
            if active[i]:
                rec.add(batch.render(i))
        for i in np.flatnonzero(active & (terminated | truncated)):
            done[i], ends[i] = True, "terminated" if terminated[i] else "truncated"
        env_s += time.perf_counter() - t1
        policy_s += t1 - t0
        policy.observe(rewards)
        step += 1
    return [asdict(tasks[i]) | {"return": float(returns[i]), "length": int(lengths[i]), "end": ends[i],
                                "policy_seconds": policy_s / n, "env_seconds": env_s / n, "policy_calls": step,
                                "gif": recorders[i].gif() if i in recorders else None}
            for i in range(n)]

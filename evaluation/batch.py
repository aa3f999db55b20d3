"""A batch of envs that one rollout actor steps in lockstep: the interface ``run_group`` drives.

``GymnasiumBatch`` (the reference protocol) holds one gymnasium env per slot and steps only the slots whose episode
is still running; ``EnvPoolBatch`` (evaluation/envpool_envs.py, the fast path) runs the same protocol in one EnvPool.
``make_batch`` picks one by ``eval.env_backend``. On gymnasium, episodes for seeds ``s_0..s_{n-1}`` depend only on
their own seed and actions, so results never depend on which actor ran a group. EnvPool fixes its generators when an
actor's pool is made (at its first group) and reuses the pool, so there an episode's no-op count, sticky actions
and MuJoCo initial noise also depend on what its env ran before (evaluation/envpool_envs.py).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from mambadm.config import CHOICES

ENV_BACKENDS = CHOICES["eval.env_backend"]


class GymnasiumBatch:
    """One gymnasium env per slot; ``reset(seeds)`` seeds each episode, ``step`` skips the slots that are done."""

    def __init__(self, envs: Sequence[Any]):
        self.envs = list(envs)
        self.action_space = self.envs[0].action_space

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        return np.stack([self.envs[i].reset(seed=int(s))[0] for i, s in enumerate(seeds)])

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, ...]:
        """Steps the ``active`` slots; returns (observations, rewards, terminated, truncated) for every slot (the
        entries of inactive slots are zeros, to be ignored)."""
        n = len(active)
        obs, rewards = None, np.zeros(n)
        terminated, truncated = np.zeros(n, bool), np.zeros(n, bool)
        for i in np.flatnonzero(active):
            o, rewards[i], terminated[i], truncated[i], _ = self.envs[i].step(actions[i])
            if obs is None:
                obs = np.zeros((n, *np.shape(o)), np.asarray(o).dtype)
            obs[i] = o
        return obs, rewards, terminated, truncated

    def render(self, i: int) -> Optional[np.ndarray]:
        return self.envs[i].render()

    def close(self) -> None:
        for env in self.envs:
            env.close()


def as_batch(envs: Any) -> Any:
    """A list of gymnasium envs becomes a ``GymnasiumBatch``; a batch passes through."""
    return GymnasiumBatch(envs) if isinstance(envs, (list, tuple)) else envs


def make_batch(eval_env: dict, cfg: Any, dataset_info: Optional[dict], n_envs: int, frame_stack: int = 4,
               render: bool = False) -> Any:
    """``n_envs`` envs of ``eval_env`` under protocol ``cfg`` on the backend ``cfg.env_backend``."""
    backend = str(getattr(cfg, "env_backend", "gymnasium"))
    if backend == "envpool":
        from evaluation.envpool_envs import EnvPoolBatch

        if render:
            raise ValueError("recording (--record) renders through gymnasium: use eval.env_backend=gymnasium")
        return EnvPoolBatch(eval_env, cfg, dataset_info, n_envs, frame_stack)
    if backend != "gymnasium":
        raise ValueError(f"eval.env_backend must be one of {list(ENV_BACKENDS)}, got '{backend}'")
    from evaluation.envs import make_env

    return GymnasiumBatch([make_env(eval_env, cfg, dataset_info, frame_stack=frame_stack, render=render)
                           for _ in range(n_envs)])

"""The evaluation protocols on EnvPool (C++ thread pools with the DQN preprocessing built in): ``eval.env_backend
= envpool``.

``envpool_id`` / ``envpool_kwargs`` map an ``EvalConfig`` onto EnvPool's options; ``EnvPoolBatch`` is the batch of
envs a rollout actor steps (the interface of evaluation/batch.py). Where EnvPool differs from the gymnasium
reference (docs/evaluation.md, "EnvPool backend"):

- No-ops at reset: 1..``noop_max`` frames on both (EnvPool cannot take none: ``noop_max >= 1``).
- EnvPool fixes an env's seed when the pool is made (``reset(seed=)`` is ignored), so every group of episodes gets
  a fresh pool with ``env_seed`` = the episodes' seeds (reduced into int32, EnvPool's range); the no-op count and
  sticky actions come from EnvPool's own generators, so a seed gives another no-op count than under gymnasium.
- Atari episodes are capped at ``max_episode_frames // frame_skip`` agent steps (EnvPool counts agent steps; ALE
  counts emulator frames, the no-op frames of the reset included).
- ``terminal_on_life_loss`` maps to ``episodic_life``: the episode ends at the first life lost in both.
- EnvPool's frame stack repeats the first frame; ``frame_padding="zero"`` zeroes the stack's slots before the first
  frame here, as the reference does.
- All envs of a pool step together: a slot whose episode ended is stepped (and auto-reset) by EnvPool while the
  others finish; its outputs are ignored, as in the reference.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from data_pipeline.sources.mujoco_tasks import gym_id

INT32_SEEDS = 2**31 - 1  # EnvPool asserts seeds in [-INT_MAX, INT_MAX)


def envpool_id(eval_env: dict, cfg: Any) -> str:
    kind = eval_env.get("kind")
    if kind == "atari":
        return f"{eval_env['game']}-v5"
    if kind == "mujoco":
        return gym_id(eval_env["task"], cfg.mujoco_version)
    raise ValueError(f"eval.env_backend=envpool runs Atari and MuJoCo envs; got eval_env {eval_env!r} (use "
                     f"eval.env_backend=gymnasium)")


def envpool_kwargs(eval_env: dict, cfg: Any, frame_stack: int = 4) -> dict:
    """EnvPool's options for the protocol ``cfg`` (docs/evaluation.md lists the mapping)."""
    if eval_env.get("kind") == "atari":
        if int(cfg.noop_max) < 1:
            raise ValueError(f"eval.noop_max={cfg.noop_max}: EnvPool always takes 1..noop_max no-op frames at reset "
                             f"(noop_max >= 1); use eval.env_backend=gymnasium for episodes without no-ops")
        if int(cfg.max_episode_frames) % int(cfg.frame_skip):
            raise ValueError(f"eval.max_episode_frames={cfg.max_episode_frames} is not a multiple of "
                             f"eval.frame_skip={cfg.frame_skip}: EnvPool caps episodes in agent steps")
        return {"frame_skip": int(cfg.frame_skip), "noop_max": int(cfg.noop_max),
                "repeat_action_probability": float(cfg.repeat_action_probability),
                "episodic_life": bool(cfg.terminal_on_life_loss), "zero_discount_on_life_loss": False,
                "reward_clip": False, "stack_num": int(frame_stack), "img_height": 84, "img_width": 84,
                "gray_scale": True, "use_inter_area_resize": True, "use_fire_reset": False,
                "full_action_space": bool(cfg.full_action_space),
                "max_episode_steps": int(cfg.max_episode_frames) // int(cfg.frame_skip)}
    envpool_id(eval_env, cfg)  # raises for kinds EnvPool does not run
    return {"max_episode_steps": int(cfg.max_episode_steps)}


class EnvPoolBatch:
    """``n_envs`` envs in one EnvPool (one C++ thread: a rollout actor holds one CPU), rebuilt per group with the
    group's episode seeds. Observations follow the reference: zero-padded Atari stacks, normalised float32 states."""

    def __init__(self, eval_env: dict, cfg: Any, dataset_info: Optional[dict], n_envs: int, frame_stack: int = 4,
                 threads: int = 1):
        import envpool

        self.envpool = envpool
        self.task_id, self.kwargs = envpool_id(eval_env, cfg), envpool_kwargs(eval_env, cfg, frame_stack)
        self.n, self.threads = int(n_envs), int(threads)
        self.atari = eval_env["kind"] == "atari"
        self.zero_padding = self.atari and cfg.frame_padding == "zero"
        info = dataset_info or {}
        self.mean = self.scale = None
        if not self.atari and info.get("state_mean") is not None:
            self.mean = np.asarray(info["state_mean"], np.float64)
            self.scale = np.asarray(info["state_std"], np.float64) + float(cfg.state_std_eps)
        self.pool = self._pool([0])
        self.action_space = self.pool.action_space
        shape = self.pool.observation_space.shape
        if self.mean is not None and (self.mean.shape != shape or self.scale.shape != shape):
            raise ValueError(f"state normalisation: mean {self.mean.shape} / std {self.scale.shape} do not match the "
                             f"env's observation shape {shape}")
        self.t = 0

    def _pool(self, seeds: Sequence[int]) -> Any:
        return self.envpool.make(self.task_id, env_type="gymnasium", num_envs=len(seeds), batch_size=len(seeds),
                                 num_threads=self.threads, env_seed=[int(s) % INT32_SEEDS for s in seeds],
                                 **self.kwargs)

    def __len__(self) -> int:
        return self.n

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if len(seeds) > self.n:
            raise ValueError(f"{len(seeds)} episodes for {self.n} envs")
        self.pool.close()
        self.pool = self._pool(seeds)
        self.t = 0
        return self.observation(self.pool.reset()[0])

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, ...]:
        obs, rewards, terminated, truncated, _ = self.pool.step(np.asarray(actions))
        self.t += 1
        return self.observation(obs), rewards.astype(np.float64), terminated, truncated

    def observation(self, obs: np.ndarray) -> np.ndarray:
        """A copy (EnvPool's arrays are views of its own buffers) in the reference's form."""
        obs = np.array(obs)
        if self.zero_padding and self.t < obs.shape[1] - 1:
            obs[:, :obs.shape[1] - 1 - self.t] = 0  # the stack's slots before the first frame
        if self.mean is not None:
            return ((obs - self.mean) / self.scale).astype(np.float32)
        return obs

    def render(self, i: int) -> None:
        return None

    def close(self) -> None:
        self.pool.close()

"""Environment construction per evaluation protocol: Atari (Decision Transformer's protocol) and MuJoCo.

``make_env(eval_env, cfg, ...)`` builds one gymnasium env from the export's ``eval_env`` description
(``{"kind": "atari", "game": "Breakout"}`` or ``{"kind": "mujoco", "task": "hopper"}``) and an ``EvalConfig``;
every protocol choice is a field of ``EvalConfig`` (see docs/evaluation.md).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np

from data_pipeline.sources.mujoco_tasks import gym_id
from evaluation.atari_frames import AtariFrames


class NormalizeState(gym.ObservationWrapper):
    """(s − mean) / (std + eps) with the dataset's fixed statistics, as float32."""

    def __init__(self, env: gym.Env, mean: Sequence[float], std: Sequence[float], eps: float):
        super().__init__(env)
        shape = env.observation_space.shape
        self.mean = np.asarray(mean, np.float64)
        self.scale = np.asarray(std, np.float64) + eps
        if self.mean.shape != shape or self.scale.shape != shape:
            raise ValueError(f"state normalisation: mean {self.mean.shape} / std {self.scale.shape} do not match the "
                             f"env's observation shape {shape}")
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.mean) / self.scale).astype(np.float32)


class SnapshotSeededReset(gym.Wrapper):
    """``reset(seed=s)`` on an ALE env without reloading the ROM each episode.

    ALE's own seeded reset reseeds its generators and reloads the ROM (~90 ms for Breakout here, as long as ~200
    agent steps), so short episodes spent half their time in resets. This wrapper loads the ROM once, keeps the
    emulator state saved right after that load, and on each seeded reset restores it (~5 ms) and reseeds the
    env's NumPy generator exactly as ALE's ``seed_game`` does (the no-op count comes from it). ALE's own generator
    draws only sticky actions, so with ``repeat_action_probability == 0`` the episode is bit-identical to ALE's
    seeded reset and independent of what the env ran before (tests/test_eval_envs.py checks both on games whose
    plain ``reset_game`` is history-dependent). With sticky actions every seeded reset goes the full way, so that
    generator is reseeded too. Unseeded resets pass through unchanged.
    """

    def __init__(self, env: gym.Env, sticky_actions: float):
        super().__init__(env)
        self.sticky = float(sticky_actions) > 0
        self.boot_state = None  # emulator state right after the ROM load

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        if seed is None or self.sticky:
            return self.env.reset(seed=seed, options=options)
        ale_env = self.env.unwrapped
        ale_env.seed_game(seed)
        if self.boot_state is None:
            ale_env.load_game()
            self.boot_state = ale_env.ale.cloneState()
        else:
            ale_env.ale.restoreState(self.boot_state)
        return self.env.reset(options=options)


def headless_gl() -> None:
    """MuJoCo renders through EGL when there is no display, unless MUJOCO_GL says otherwise; this must run before
    ``mujoco`` is first imported in the process (rollout actors call it first thing)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")


def make_atari(game: str, cfg: Any, frame_stack: int = 4, render: bool = False) -> gym.Env:
    """ALE v5 env with frameskip=1 underneath AtariPreprocessing (action repeat, max-pool, 84×84 gray, no-op starts)
    and a frame stack; the episode is cut by ALE at ``cfg.max_episode_frames`` emulator frames. Seeded resets
    restore a saved emulator state instead of reloading the ROM (``SnapshotSeededReset``)."""
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=float(cfg.repeat_action_probability),
                   full_action_space=bool(cfg.full_action_space),
                   max_num_frames_per_episode=int(cfg.max_episode_frames),
                   render_mode="rgb_array" if render else None)
    env = SnapshotSeededReset(env, cfg.repeat_action_probability)
    if cfg.frame_processing == "dopamine" and int(cfg.noop_min) == 1:
        env = gym.wrappers.AtariPreprocessing(env, noop_max=int(cfg.noop_max), frame_skip=int(cfg.frame_skip),
                                              screen_size=84, terminal_on_life_loss=bool(cfg.terminal_on_life_loss),
                                              grayscale_obs=True, scale_obs=False)
    elif cfg.terminal_on_life_loss:
        raise ValueError("eval.terminal_on_life_loss needs eval.frame_processing=dopamine and eval.noop_min=1")
    else:  # DT's frame order or no-op range (evaluation/atari_frames.py)
        env = AtariFrames(env, str(cfg.frame_processing), int(cfg.frame_skip), int(cfg.noop_min), int(cfg.noop_max))
    padding = "zero" if cfg.frame_padding == "zero" else "reset"
    if padding == "zero":
        padding = np.zeros((84, 84), np.uint8)
    return gym.wrappers.FrameStackObservation(env, frame_stack, padding_type=padding)


def make_mujoco(task: str, cfg: Any, state_mean: Optional[Sequence[float]] = None,
                state_std: Optional[Sequence[float]] = None, render: bool = False) -> gym.Env:
    """Gymnasium MuJoCo locomotion env (v5 by default) with a ``cfg.max_episode_steps`` time limit and, when the
    dataset's statistics are given, normalised states."""
    env_id = gym_id(task, cfg.mujoco_version)
    if render:
        headless_gl()
    env = gym.make(env_id, max_episode_steps=int(cfg.max_episode_steps),
                   render_mode="rgb_array" if render else None)
    if (state_mean is None) != (state_std is None):
        raise ValueError("state normalisation needs both state_mean and state_std")
    if state_mean is not None:
        env = NormalizeState(env, state_mean, state_std, float(cfg.state_std_eps))
    return env


def make_env(eval_env: dict, cfg: Any, dataset_info: Optional[dict] = None, frame_stack: int = 4,
             render: bool = False) -> gym.Env:
    """One env for ``eval_env`` under protocol ``cfg``; MuJoCo states are normalised with ``dataset_info``'s
    ``state_mean`` / ``state_std`` when present."""
    kind = eval_env.get("kind")
    if kind == "atari":
        return make_atari(eval_env["game"], cfg, frame_stack=frame_stack, render=render)
    if kind == "mujoco":
        info = dataset_info or {}
        return make_mujoco(eval_env["task"], cfg, info.get("state_mean"), info.get("state_std"), render=render)
    if kind == "gymnasium":  # any other registered gymnasium env (e.g. a Minari dataset's env), vector states
        info = dataset_info or {}
        env = gym.make(eval_env["id"], max_episode_steps=int(cfg.max_episode_steps),
                       render_mode="rgb_array" if render else None)
        if info.get("state_mean") is not None:
            env = NormalizeState(env, info["state_mean"], info["state_std"], float(cfg.state_std_eps))
        return env
    raise ValueError(f"eval_env: kind must be 'atari', 'mujoco' or 'gymnasium', got {eval_env!r}")


def protocol(eval_env: dict, cfg: Any, frame_stack: int = 4) -> dict:
    """The protocol choices that shaped an evaluation, for results.json: the backend that ran it and, for EnvPool,
    the options the protocol was mapped to."""
    backend = str(getattr(cfg, "env_backend", "gymnasium"))
    common = {"env": dict(eval_env), "env_backend": backend}
    if backend == "envpool":
        from evaluation.envpool_envs import envpool_id, envpool_kwargs

        common["envpool"] = {"id": envpool_id(eval_env, cfg), **envpool_kwargs(eval_env, cfg, frame_stack)}
    if eval_env["kind"] == "atari":
        return common | {
            "env_id": f"ALE/{eval_env['game']}-v5", "frameskip_base": 1, "frame_skip": int(cfg.frame_skip),
            "max_pool_last_two_frames": True, "screen": [84, 84], "grayscale": True, "frame_stack": frame_stack,
            "frame_padding": str(cfg.frame_padding), "noop_max": int(cfg.noop_max), "noop_min": int(cfg.noop_min),
            "frame_processing": str(cfg.frame_processing),
            "repeat_action_probability": float(cfg.repeat_action_probability),
            "terminal_on_life_loss": bool(cfg.terminal_on_life_loss),
            "full_action_space": bool(cfg.full_action_space), "max_episode_frames": int(cfg.max_episode_frames),
        }
    env_id = eval_env["id"] if eval_env["kind"] == "gymnasium" else gym_id(eval_env["task"], cfg.mujoco_version)
    return common | {"env_id": env_id,
                     "max_episode_steps": int(cfg.max_episode_steps), "state_std_eps": float(cfg.state_std_eps)}

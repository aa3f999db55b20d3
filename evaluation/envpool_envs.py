"""The evaluation protocols on EnvPool (C++ thread pools with the DQN preprocessing built in): ``eval.env_backend
= envpool``.

``envpool_id`` / ``envpool_kwargs`` map an ``EvalConfig`` onto EnvPool's options and refuse the protocol switches
EnvPool cannot express; ``EnvPoolBatch`` is the batch of envs a rollout actor steps (the interface of
evaluation/batch.py). Where EnvPool differs from the gymnasium reference (docs/evaluation.md, "EnvPool backend"):

- Frames: EnvPool max-pools the last two raw frames, then resizes (Dopamine's order, ``frame_processing=dopamine``)
  and has no option for DT's resize-then-max-pool. Raw frames are available (``frame_skip=1``, 210x160: the
  emulator's screens, checked), so DT's order could be rebuilt in Python, but at four pool calls and two Python
  resizes per agent step, which gives up what EnvPool is for; and DT's setting also takes 0..29 no-ops, which
  EnvPool cannot (below). So ``frame_processing=dt`` is refused (gymnasium runs it).
- No-ops at reset: 1..``noop_max`` frames (EnvPool draws ``1 + uniform(0, noop_max - 1)``), so ``noop_min`` must be
  1 and ``noop_max >= 1``; DT's 0..29 (``noop_min=0``) is refused (gymnasium runs it).
- Seeds: one pool per actor, made once (on the actor's first group) and reset per episode. EnvPool fixes each env's
  generator when the pool is made (``reset(seed=)`` is ignored), so env ``j`` is made with ``env_seed`` = the
  episode seed of slot ``j`` of that first group (mod 2**31 - 1, EnvPool's range; slots that group leaves empty get
  seeds derived from it) and every later episode in slot ``j`` draws its no-op count, sticky actions or MuJoCo
  initial noise from that env's continuing generator. The per-episode seed still seeds the policy's sampler.
  Where the protocol draws nothing (Atari with ``noop_max=1`` and no sticky actions) an episode depends only on
  the policy and its seed; elsewhere it depends on its slot's history too (docs/evaluation.md).
- Atari episodes are capped at ``max_episode_frames // frame_skip`` agent steps (EnvPool counts agent steps; ALE
  counts emulator frames, the no-op frames of the reset included).
- ``terminal_on_life_loss``: the batch ends the episode at the first life lost (EnvPool runs with
  ``episodic_life=False``, whose reset would continue the same game in a reused env).
- EnvPool's frame stack repeats the first frame; ``frame_padding="zero"`` zeroes the stack's slots before the first
  frame here, as the reference does.
- Only the slots whose episode is still running are stepped (EnvPool's ``env_id``), as in the reference; the
  batch calls the pool's C++ send / recv directly (``PoolCalls``), without EnvPool's per-call Python wrapper.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np

from data_pipeline.sources.mujoco_tasks import gym_id

INT32_SEEDS = 2**31 - 1  # EnvPool asserts seeds in [-INT_MAX, INT_MAX)
# From this many envs per actor EnvPool stepped MuJoCo faster than gymnasium in every benchmark row; below it, down to
# 0.7x (benchmarks/RESULTS.md, "EnvPool backend, one pool per actor", the 2026-12-07 rerun): its fixed cost per call,
# the hand-off to its C++ thread and back, weighs against a MuJoCo step that costs gymnasium ~100-150 us.
MUJOCO_CROSSOVER_ENVS = 16


class SmallMuJoCoPoolWarning(UserWarning):
    """EnvPool on MuJoCo with fewer envs per actor than ``MUJOCO_CROSSOVER_ENVS``: possibly slower than gymnasium."""


def envpool_id(eval_env: dict, cfg: Any) -> str:
    kind = eval_env.get("kind")
    if kind == "atari":
        return f"{eval_env['game']}-v5"
    if kind == "mujoco":
        return gym_id(eval_env["task"], cfg.mujoco_version)
    raise ValueError(f"eval.env_backend=envpool runs Atari and MuJoCo envs; got eval_env {eval_env!r} (use "
                     f"eval.env_backend=gymnasium)")


def check_atari(cfg: Any) -> None:
    """Refuses the Atari protocol switches EnvPool cannot express, naming the key, its value and the backend that
    runs it."""
    processing = str(getattr(cfg, "frame_processing", "dopamine"))
    if processing != "dopamine":
        raise ValueError(f"eval.frame_processing={processing}: EnvPool max-pools the last two raw frames and then "
                         f"resizes (Dopamine's order, eval.frame_processing=dopamine) and has no option to resize each "
                         f"frame first as DT does. Use eval.env_backend=gymnasium for "
                         f"eval.frame_processing={processing}")
    noop_min = int(getattr(cfg, "noop_min", 1))
    if noop_min != 1:
        raise ValueError(f"eval.noop_min={noop_min}: EnvPool draws 1..noop_max no-op frames at reset "
                         f"(eval.noop_min=1 only). Use eval.env_backend=gymnasium for eval.noop_min={noop_min} "
                         f"(DT's 0..29 is noop_min=0, noop_max=29)")
    if int(cfg.noop_max) < 1:
        raise ValueError(f"eval.noop_max={cfg.noop_max}: EnvPool always takes 1..noop_max no-op frames at reset "
                         f"(noop_max >= 1); use eval.env_backend=gymnasium for episodes without no-ops")
    if int(cfg.max_episode_frames) % int(cfg.frame_skip):
        raise ValueError(f"eval.max_episode_frames={cfg.max_episode_frames} is not a multiple of "
                         f"eval.frame_skip={cfg.frame_skip}: EnvPool caps episodes in agent steps; use a multiple "
                         f"or eval.env_backend=gymnasium")


def envpool_kwargs(eval_env: dict, cfg: Any, frame_stack: int = 4) -> dict:
    """EnvPool's options for the protocol ``cfg`` (docs/evaluation.md lists the mapping); a ``ValueError`` for what
    EnvPool cannot run, a warning where it can run MuJoCo slower than gymnasium (``warn_small_mujoco_pool``)."""
    if eval_env.get("kind") == "atari":
        check_atari(cfg)
        return {"frame_skip": int(cfg.frame_skip), "noop_max": int(cfg.noop_max),
                "repeat_action_probability": float(cfg.repeat_action_probability),
                "episodic_life": False, "zero_discount_on_life_loss": False,
                "reward_clip": False, "stack_num": int(frame_stack), "img_height": 84, "img_width": 84,
                "gray_scale": True, "use_inter_area_resize": True, "use_fire_reset": False,
                "full_action_space": bool(cfg.full_action_space),
                "max_episode_steps": int(cfg.max_episode_frames) // int(cfg.frame_skip)}
    envpool_id(eval_env, cfg)  # raises for kinds EnvPool does not run
    warn_small_mujoco_pool(cfg)
    return {"max_episode_steps": int(cfg.max_episode_steps)}


def warn_small_mujoco_pool(cfg: Any) -> None:
    """Says (``SmallMuJoCoPoolWarning``) when ``cfg.envs_per_actor`` is below the measured MuJoCo crossover; the
    backend stays the one asked for (results.json records it)."""
    envs = int(cfg.envs_per_actor)
    if envs < MUJOCO_CROSSOVER_ENVS:
        warnings.warn(f"eval.env_backend=envpool on MuJoCo with eval.envs_per_actor={envs}: below "
                      f"{MUJOCO_CROSSOVER_ENVS} envs per actor EnvPool can step MuJoCo slower than gymnasium (down "
                      f"to 0.7x in benchmarks/RESULTS.md: its fixed cost per call, the hand-off to its C++ thread, "
                      f"weighs against the cheap MuJoCo step). Raise --envs-per-actor to {MUJOCO_CROSSOVER_ENVS} or "
                      f"more, or use eval.env_backend=gymnasium", SmallMuJoCoPoolWarning, stacklevel=2)


def construction_seeds(seeds: Sequence[int], n_envs: int) -> list[int]:
    """EnvPool's ``env_seed`` for a pool of ``n_envs`` made at a group with episode seeds ``seeds``: slot ``j`` gets
    ``seeds[j]``, slots past the group get seeds derived from the group's; all reduced into EnvPool's int32 range."""
    out = [int(s) for s in seeds[:n_envs]]
    if len(out) < n_envs:
        extra = np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seeds] + [n_envs]).generate_state(n_envs)
        out += [int(s) for s in extra[len(out):]]
    return [s % INT32_SEEDS for s in out]


def in_slots(values: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """``values`` of the slots ``ids`` (sorted, as sent) in an array of ``n`` slots, zeros elsewhere; all ``n``
    slots: ``values`` itself."""
    if len(ids) == n:
        return values
    out = np.zeros((n, *values.shape[1:]), values.dtype)
    out[ids] = values
    return out


class PoolCalls:
    """A pool's own C++ calls, without EnvPool's gymnasium wrapper (which converts the action per call, rebuilds
    its config dict and an info tree from every state field): ``step`` and ``reset`` return the state fields this
    batch reads, by EnvPool's names. The pool is synchronous (``batch_size = num_envs``), so each field lists the
    envs in the order their ids were sent; every receive hands out fresh arrays (EnvPool swaps in a new state buffer
    per call), which the batch may modify."""

    ACTION_KEYS = ["env_id", "players.env_id", "action"]
    STATE_KEYS = ("obs", "reward", "done", "trunc", "info:lives")

    def __init__(self, pool: Any):
        if list(pool._action_keys) != self.ACTION_KEYS:
            raise RuntimeError(f"EnvPool's action fields are {pool._action_keys}, expected {self.ACTION_KEYS}: "
                               f"this EnvPool version is not supported by eval.env_backend=envpool")
        self.pool = pool
        self.action_dtype = np.dtype(pool._spec._action_spec[-1][0])
        self.fields = {key: i for i, key in enumerate(pool._state_keys) if key in self.STATE_KEYS}

    def step(self, actions: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Steps the envs ``ids`` (int32) with ``actions`` (one row per id)."""
        action = np.ascontiguousarray(actions, self.action_dtype)  # EnvPool reads it until _recv returns
        self.pool._send([ids, ids, action])
        return self.receive()

    def reset(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        self.pool._reset(ids)
        return self.receive()

    def receive(self) -> dict[str, np.ndarray]:
        state = self.pool._recv()
        return {key: state[i] for key, i in self.fields.items()}


class EnvPoolBatch:
    """``n_envs`` envs in one EnvPool (one C++ thread: a rollout actor holds one CPU), made once, on the first
    ``reset``, and reset per episode after that (``pools_made`` counts the pools made). Observations follow the
    reference: zero-padded Atari stacks, normalised float32 states."""

    def __init__(self, eval_env: dict, cfg: Any, dataset_info: Optional[dict], n_envs: int, frame_stack: int = 4,
                 threads: int = 1):
        import envpool

        self.envpool = envpool
        self.task_id, self.kwargs = envpool_id(eval_env, cfg), envpool_kwargs(eval_env, cfg, frame_stack)
        self.n, self.threads = int(n_envs), int(threads)
        if self.n < 1:
            raise ValueError(f"an EnvPool batch needs at least one env, got n_envs={n_envs}")
        self.atari = eval_env["kind"] == "atari"
        self.zero_padding = self.atari and cfg.frame_padding == "zero"
        self.life_loss_ends = self.atari and bool(cfg.terminal_on_life_loss)
        info = dataset_info or {}
        self.mean = self.scale = None
        if not self.atari and info.get("state_mean") is not None:
            self.mean = np.asarray(info["state_mean"], np.float64)
            self.scale = np.asarray(info["state_std"], np.float64) + float(cfg.state_std_eps)
        spec = envpool.make_spec(self.task_id, **self.kwargs)  # spaces without making a pool
        self.action_space, self.observation_space = spec.action_space, spec.observation_space
        shape = self.observation_space.shape
        if self.mean is not None and (self.mean.shape != shape or self.scale.shape != shape):
            raise ValueError(f"state normalisation: mean {self.mean.shape} / std {self.scale.shape} do not match the "
                             f"env's observation shape {shape}")
        self.pool = self.calls = None
        self.pools_made = 0
        self.env_seeds: list[int] = []  # the pool's env_seed, once made
        self.slot_ids = np.arange(self.n, dtype=np.int32)
        self.t = np.zeros(self.n, np.int64)  # agent steps since each slot's reset (counted for the zero padding)
        self.lives = np.zeros(self.n, np.int64)

    def _make_pool(self, seeds: Sequence[int]) -> None:
        self.env_seeds = construction_seeds(seeds, self.n)
        self.pool = self.envpool.make(self.task_id, env_type="gymnasium", num_envs=self.n, batch_size=self.n,
                                      num_threads=self.threads, env_seed=self.env_seeds, **self.kwargs)
        self.calls = PoolCalls(self.pool)
        self.pools_made += 1

    def __len__(self) -> int:
        return self.n

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Starts an episode in slots ``0 .. len(seeds) - 1``; the pool is made at the first call (module doc:
        seeds)."""
        k = len(seeds)
        if not 1 <= k <= self.n:
            raise ValueError(f"{k} episodes for {self.n} envs")
        if self.pool is None:
            self._make_pool(seeds)
        state = self.calls.reset(self.slot_ids[:k])
        self.t[:k] = 0
        if self.atari:
            self.lives[:k] = state["info:lives"]
        return self.observation(state["obs"], self.t[:k])

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, ...]:
        """Steps the ``active`` slots only; returns (observations, rewards, terminated, truncated) for every slot of
        the group (the entries of inactive slots are zeros, to be ignored)."""
        n = len(active)
        ids = self.slot_ids[:n] if active.all() else np.flatnonzero(active).astype(np.int32)
        if len(ids) == 0:
            obs = np.zeros((n, *self.observation_space.shape), self.observation_space.dtype)
            return self.observation(obs, self.t[:n]), np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
        state = self.calls.step(actions if len(ids) == n else np.asarray(actions)[ids], ids)
        truncated = state["trunc"]
        terminated = state["done"] & ~truncated
        if self.life_loss_ends:  # gymnasium's AtariPreprocessing: a life lost ends the episode
            lives = state["info:lives"]
            terminated |= lives < self.lives[ids]
            self.lives[ids] = lives
        if self.zero_padding:
            self.t[ids] += 1
        obs = in_slots(state["obs"], ids, n)
        return (self.observation(obs, self.t[:n]), in_slots(state["reward"].astype(np.float64), ids, n),
                in_slots(terminated, ids, n), in_slots(truncated, ids, n))

    def observation(self, obs: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``obs`` (owned here) in the reference's form; ``t``: each slot's agent steps since its reset."""
        if self.zero_padding:
            stack = obs.shape[1]
            for i in np.flatnonzero(t < stack - 1):
                obs[i, :stack - 1 - t[i]] = 0  # the stack's slots before the first frame
        if self.mean is not None:
            return ((obs - self.mean) / self.scale).astype(np.float32)
        return obs

    def render(self, i: int) -> None:
        return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = self.calls = None

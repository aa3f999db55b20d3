"""Atari frame processing in either order, with no-op starts drawn from ``[noop_min, noop_max]`` (docs/protocol.md).

The agent repeats each action ``frame_skip`` times and sees the maximum of the last two raw frames, as 84x84 gray:

- ``dopamine``: max-pool the two raw 210x160 frames, then resize with ``cv2.INTER_AREA``: Dopamine's order, in which
  DQN-Replay was logged, and gymnasium's ``AtariPreprocessing`` (which ``make_atari`` uses for this order with the
  default no-op range; tests check this wrapper against it). The raw frames persist across steps, and an episode end
  inside the repeat stops before they are grabbed, as there.
- ``dt``: resize each of the two raw frames with ``cv2.INTER_LINEAR``, then max-pool (kzl/decision-transformer
  atari/mingpt/trainer_atari.py:244, 272-283): the pooled frames start at zero every step, a frame is grabbed before
  the episode end is checked, and the reset frame is one resized frame.

No-ops: ``integers(noop_min, noop_max + 1)`` from the env's generator (gymnasium draws 1..30, DT's
``random.randrange(30)`` 0..29), restarting the game when it ends during them. Life loss never ends an episode here.
"""
from __future__ import annotations

from typing import Any, Optional

import cv2
import gymnasium as gym
import numpy as np

ORDERS = ("dopamine", "dt")
SIZE = (84, 84)


class AtariFrames(gym.Wrapper):
    """Action repeat, two-frame max-pool and 84x84 gray frames in ``order``, over an ALE env with frameskip 1."""

    def __init__(self, env: gym.Env, order: str, frame_skip: int = 4, noop_min: int = 1, noop_max: int = 30):
        super().__init__(env)
        if order not in ORDERS:
            raise ValueError(f"eval.frame_processing must be one of {list(ORDERS)}, got {order!r}")
        if not 0 <= noop_min <= noop_max or frame_skip < 2:
            raise ValueError(f"expected 0 <= eval.noop_min <= eval.noop_max and eval.frame_skip >= 2, got noop_min="
                             f"{noop_min}, noop_max={noop_max}, frame_skip={frame_skip}")
        self.order, self.frame_skip, self.noop_min, self.noop_max = order, frame_skip, noop_min, noop_max
        shape = env.observation_space.shape[:2]
        self.raw = [np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)]  # dopamine: the last and second-last
        self.observation_space = gym.spaces.Box(0, 255, SIZE, np.uint8)

    @property
    def ale(self) -> Any:
        return self.env.unwrapped.ale

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        _, info = self.env.reset(seed=seed, options=options)
        noops = int(self.env.unwrapped.np_random.integers(self.noop_min, self.noop_max + 1)) if self.noop_max else 0
        for _ in range(noops):
            _, _, terminated, truncated, step_info = self.env.step(0)
            info.update(step_info)
            if terminated or truncated:
                _, info = self.env.reset(seed=seed, options=options)
        self.ale.getScreenGrayscale(self.raw[0])
        self.raw[1].fill(0)
        if self.order == "dt":
            return cv2.resize(self.raw[0], SIZE, interpolation=cv2.INTER_LINEAR), info
        return cv2.resize(self.raw[0], SIZE, interpolation=cv2.INTER_AREA), info

    def step(self, action: Any):
        if self.order == "dt":
            return self._step_dt(action)
        total, terminated, truncated, info = 0.0, False, False, {}
        for t in range(self.frame_skip):
            _, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
            if t >= self.frame_skip - 2:
                self.ale.getScreenGrayscale(self.raw[self.frame_skip - 1 - t])
        pooled = np.maximum(self.raw[0], self.raw[1])
        return cv2.resize(pooled, SIZE, interpolation=cv2.INTER_AREA), total, terminated, truncated, info

    def _step_dt(self, action: Any):
        total, terminated, truncated, info = 0.0, False, False, {}
        pooled = np.zeros(SIZE, np.uint8)
        for t in range(self.frame_skip):
            _, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if t >= self.frame_skip - 2:
                frame = cv2.resize(self.ale.getScreenGrayscale(), SIZE, interpolation=cv2.INTER_LINEAR)
                np.maximum(pooled, frame, out=pooled)
            if terminated or truncated:
                break
        return pooled, total, terminated, truncated, info

"""The unit every reader yields: one episode of a behaviour policy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    observations: np.ndarray  # (T, 84, 84) uint8 single frames, or (T, obs_dim) float32 states
    actions: np.ndarray  # (T,) int64 discrete, or (T, act_dim) float32 continuous
    rewards: np.ndarray  # (T,) float32
    terminated: bool  # ended in a terminal state
    truncated: bool  # cut: time limit, buffer edge or end of file
    source: str = ""  # file (or checkpoint) it came from
    episode_id: int = 0  # unique within one source dataset

    def __post_init__(self) -> None:
        t = len(self.rewards)
        if len(self.observations) != t or len(self.actions) != t:
            raise ValueError(
                f"{self.source}: episode {self.episode_id}: observations {len(self.observations)}, "
                f"actions {len(self.actions)} and rewards {t} must have the same length")

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def total_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    def returns_to_go(self) -> np.ndarray:
        """Undiscounted returns-to-go over the whole episode: rtg[t] = sum(rewards[t:])."""
        return np.cumsum(self.rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)

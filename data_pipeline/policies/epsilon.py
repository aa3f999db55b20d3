"""Epsilon-mixing of a scripted player with uniformly random actions (a random player where none is scripted)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from data_pipeline.policies.breakout import breakout_action

SCRIPTED: dict[str, Callable[[np.ndarray], int]] = {"Breakout": breakout_action}  # game -> player(ram) -> action


class EpsilonPlayer:
    """Takes a uniformly random action with probability ``epsilon``, the scripted player's otherwise
    (always random for games without one)."""

    def __init__(self, game: str, num_actions: int, rng: np.random.Generator):
        self.scripted: Optional[Callable[[np.ndarray], int]] = SCRIPTED.get(game)
        self.num_actions, self.rng = num_actions, rng

    def act(self, ram: np.ndarray, epsilon: float) -> int:
        if self.scripted is None or self.rng.random() < epsilon:
            return int(self.rng.integers(self.num_actions))
        return self.scripted(ram)
